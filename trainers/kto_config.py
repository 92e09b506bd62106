"""KTOMethodConfig: the KTO settings heedful exposes, with their defaults written once; the
`kto` stage's config subclasses it and turns it into TRL's `KTOConfig` (`trl_kwargs`).
Imports pydantic only.

Defaults are TRL's (Ethayarajh et al., 2024): beta 0.1, desirable and undesirable weights 1
(TRL warns when the class balance calls for other weights); learning rate 5e-5 for LoRA
(TRL's 1e-6 is meant for full fine-tuning). KTO estimates its KL term from mismatched
pairs inside a batch, so the per-device batch must hold at least two rows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.stage import StageConfig


class KTOMethodConfig(StageConfig):
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = Field(default=1.0, gt=0, description="weight of desirable rows (raise when they are rarer)")
    undesirable_weight: float = Field(default=1.0, gt=0, description="weight of undesirable rows")
    learning_rate: float = Field(default=5e-5, gt=0)

    def trl_kwargs(self) -> dict[str, Any]:
        """The method's keys of TRL's KTOConfig (the training keys come from TrainSettings)."""
        return {
            "beta": self.beta,
            "loss_type": self.loss_type,
            "desirable_weight": self.desirable_weight,
            "undesirable_weight": self.undesirable_weight,
        }
