"""C3POConfig: C3PO's own settings and their defaults, written once (trainers/c3po.py's
`C3POTrainer` takes it; the `c3po` stage's config subclasses it). Imports pydantic only, so
a stage module can import it without loading torch.

Defaults follow the paper (Stephan et al., 2024): beta 0.1, sigma_soft 0.2 (out-of-scope),
sigma_hard 0.1 (near-scope), the NLL regulariser summed per reply; learning rate 1e-4 for LoRA.
One deviation, chosen on three feedbacks (docs/arena.md, "Method defaults across the three
feedbacks"): `rpo_alpha` 1.0, RPO's NLL term on the in-scope revisions. Without it C3PO preferred
a length rule's revisions without writing them (1/10 in scope; 5/10 with it), and it was never
worse on the prefix and suffix feedbacks. `rpo_alpha: 0` is the paper's loss.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.stage import StageConfig

Regularizer = Literal["nll", "kl"]
Reduction = Literal["sequence", "token"]


class C3POConfig(StageConfig):
    """What C3PO learns and how strongly it is held to the original model."""

    beta: float = Field(default=0.1, gt=0, description="DPO temperature on the in-scope pairs")
    sigma_soft: float = Field(default=0.2, ge=0, description="weight of the out-of-scope constraint")
    sigma_hard: float = Field(default=0.1, ge=0, description="weight of the near-scope constraint")
    regularizer: Regularizer = Field(default="nll", description="nll of the original replies, or KL to the reference")
    kl_temperature: float = Field(default=1.0, gt=0)
    reduction: Reduction = Field(default="sequence", description="constraint summed per reply (paper) or token mean")
    learning_rate: float = Field(default=1e-4, gt=0)
    rpo_alpha: float | None = Field(
        default=1.0,
        ge=0,
        description=(
            "weight of an NLL term on the in-scope revision (RPO's remedy, per-token mean as TRL's rpo_alpha): DPO can "
            "make the revision preferred without making it the reply the model writes; 0 (or null) is the paper's loss"
        ),
    )
