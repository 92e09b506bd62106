"""DPOMethodConfig: the DPO settings heedful exposes, with their defaults written once; the
`dpo` stage's config subclasses it and turns it into TRL's `DPOConfig` (`trl_kwargs`).
Imports pydantic only. Defaults are TRL's (beta 0.1, sigmoid loss); learning rate 5e-5.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.stage import StageConfig


class DPOMethodConfig(StageConfig):
    beta: float = Field(default=0.1, gt=0)
    loss_type: str = Field(default="sigmoid", description="TRL DPO loss: sigmoid, ipo, hinge, robust, ...")
    learning_rate: float = Field(default=5e-5, gt=0)

    def trl_kwargs(self) -> dict[str, Any]:
        """The method's keys of TRL's DPOConfig (the training keys come from TrainSettings)."""
        return {"beta": self.beta, "loss_type": [self.loss_type]}
