"""KTOMethodConfig: the KTO settings heedful exposes, with their defaults written once; the
`kto` stage's config subclasses it and turns it into TRL's `KTOConfig` (`trl_kwargs`).
Imports pydantic only.

Defaults are TRL's (Ethayarajh et al., 2024): beta 0.1, desirable and undesirable weights 1,
except that `balance_classes` (on) raises the rarer class's weight to the paper's recommended
ratio where TRL only warns; learning rate 5e-5 for LoRA
(TRL's 1e-6 is meant for full fine-tuning). KTO estimates its KL term from mismatched
pairs inside a batch, so the per-device batch must hold at least two rows.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import Field

from pipeline.stage import StageConfig

_Config = TypeVar("_Config", bound="KTOMethodConfig")


class KTOMethodConfig(StageConfig):
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = Field(default=1.0, gt=0, description="weight of desirable rows (raise when they are rarer)")
    undesirable_weight: float = Field(default=1.0, gt=0, description="weight of undesirable rows")
    learning_rate: float = Field(default=5e-5, gt=0)
    precompute_ref_log_probs: bool | None = Field(
        default=None,
        description=(
            "TRL's own step (fast: false): compute the reference log-probs once before training (TRL's precompute) "
            "instead of in every step; default: when the run reads every row at least twice, on one worker, without "
            "QLoRA (bench/kto_step.py). The fast core caches them where the run reads every row at least once"
        ),
    )
    balance_classes: bool = Field(
        default=True,
        description=(
            "with both weights left at 1: raise the rarer class's weight so that desirable_weight * n_desirable "
            "= undesirable_weight * n_undesirable (the KTO paper's rule; TRL only warns)"
        ),
    )

    def trl_kwargs(self) -> dict[str, Any]:
        """The method's keys of TRL's KTOConfig (the training keys come from TrainSettings)."""
        return {
            "beta": self.beta,
            "loss_type": self.loss_type,
            "desirable_weight": self.desirable_weight,
            "undesirable_weight": self.undesirable_weight,
            "precompute_ref_log_probs": bool(self.precompute_ref_log_probs),
        }

    def balanced(self: _Config, desirable: int, undesirable: int) -> _Config:
        """These settings with the class weights balanced for the counts (see `balance_classes`).

        Why: KTO's loss sums over desirable and undesirable rows separately; with many more of one
        kind, the other barely moves the adapter. Ethayarajh et al. (2024) recommend
        desirable_weight * n_D / (undesirable_weight * n_U) in [1, 4/3]; this sets it to 1 by
        raising the rarer class's weight. Weights set by hand are kept."""
        if not self.balance_classes or (self.desirable_weight, self.undesirable_weight) != (1.0, 1.0):
            return self
        if 0 < desirable < undesirable:
            return self.model_copy(update={"desirable_weight": undesirable / desirable})
        if 0 < undesirable < desirable:
            return self.model_copy(update={"undesirable_weight": desirable / undesirable})
        return self
