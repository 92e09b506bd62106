"""DPOMethodConfig: the DPO settings heedful exposes, with their defaults written once; the
`dpo` stage's config subclasses it and turns it into TRL's `DPOConfig` (`trl_kwargs`).
Imports pydantic only. Defaults are TRL's (beta 0.1, sigmoid loss); learning rate 5e-5.

`rpo_alpha` is RPO (Pang et al., "Iterative Reasoning Preference Optimization", 2024), with
the semantics of TRL's former `DPOConfig.rpo_alpha`: the loss becomes
    DPO loss + rpo_alpha * NLL(chosen)
where NLL(chosen) is the mean negative log-probability per token over the batch's chosen
reply tokens. TRL 1.x spells it as the extra loss type "sft" with weight `rpo_alpha`, which
is what `trl_kwargs` passes (and what heedful's fast core computes exactly). Why: a DPO-style
loss can raise the chosen reply's log-probability *relative* to the rejected one while both
fall, so the preferred reply never becomes the one the model writes; the NLL term pulls the
chosen reply up in absolute terms. None (default): plain DPO.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from pipeline.stage import StageConfig


class DPOMethodConfig(StageConfig):
    beta: float = Field(default=0.1, gt=0)
    loss_type: str = Field(default="sigmoid", description="TRL DPO loss: sigmoid, ipo, hinge, robust, ...")
    learning_rate: float = Field(default=5e-5, gt=0)
    rpo_alpha: float | None = Field(
        default=None, ge=0, description="RPO: add rpo_alpha x the chosen replies' NLL per token (the paper uses 1.0)"
    )

    @model_validator(mode="after")
    def _rpo_is_not_sft_twice(self) -> DPOMethodConfig:
        if self.rpo_alpha is not None and self.loss_type == "sft":
            raise ValueError("rpo_alpha adds the NLL ('sft') term to a preference loss; loss_type sft already is that term")
        return self

    def trl_kwargs(self) -> dict[str, Any]:
        """The method's keys of TRL's DPOConfig (the training keys come from TrainSettings)."""
        if self.rpo_alpha is None:
            return {"beta": self.beta, "loss_type": [self.loss_type]}
        return {"beta": self.beta, "loss_type": [self.loss_type, "sft"], "loss_weights": [1.0, self.rpo_alpha]}
