"""CUTConfig: CUT's own settings and their defaults, written once (trainers/cut.py's
`CUTTrainer` takes it; the `cut` stage's config subclasses it). Imports pydantic only.

Defaults are the authors' (Xu et al., 2023): lambda 1.1, alpha 0.1, a constant unlikelihood
weight (gamma 0); learning rate 1e-4 for LoRA.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.stage import StageConfig

#: how a negative judgment joins the instruction in the Align-N prompt
DEFAULT_JUDGMENT_TEMPLATE = "{instruction}\n\nA judgment of the response to write: {judgment}"


class CUTConfig(StageConfig):
    """Which tokens a negative judgment marks, and how hard they are pushed down."""

    threshold: float = Field(default=1.1, ge=1.0, description="lambda: p(y|x,j)/p(y|x) above it marks a token inappropriate")
    alpha: float = Field(default=0.1, ge=0, description="unlikelihood weight (the authors' default)")
    gamma: float = Field(default=0.0, ge=0, description="dynamic weight exponent on p(y|x,j); 0 = constant alpha")
    judgment_template: str = DEFAULT_JUDGMENT_TEMPLATE
    learning_rate: float = Field(default=1e-4, gt=0)
