"""SFTMethodConfig: the SFT settings heedful exposes, with their defaults written once; the
`sft` stage's config subclasses it and turns it into TRL's `SFTConfig` (`trl_kwargs`).
Imports pydantic only.

Why these defaults:
- `learning_rate` 1e-4: a LoRA adapter trained on a next-token NLL, as C3PO, CUT and CoH
  train theirs (TRL's 2e-5 is meant for full fine-tuning; LoRA wants about ten times more).
- the loss is on the reply tokens only (TRL's `completion_only_loss`): the prompts are the
  user's words, not something the model should learn to write.
- `finished_only` true and `other_scopes` true: the same rows `feedback_views` keeps for the
  other methods, so the arena compares methods on the same examples. A reply cut off at the
  sampling limit has no end; trained on, it teaches the model never to stop (issue 13's
  suffix feedback: the sentence repeated to the token limit). Near/out-of-scope baselines
  are the model's own replies where the feedback must not apply: training on them keeps the
  adapter's behaviour there, as C3PO's regularizer does.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.stage import StageConfig


class SFTMethodConfig(StageConfig):
    learning_rate: float = Field(default=1e-4, gt=0)
    finished_only: bool = Field(
        default=True,
        description="data: leave out rows whose baseline or revision was cut off (false: train them without an end token)",
    )
    other_scopes: bool = Field(default=True, description="data: also train on near/out-of-scope baseline replies")

    def trl_kwargs(self) -> dict[str, Any]:
        """The method's keys of TRL's SFTConfig (the training keys come from TrainSettings)."""
        return {"completion_only_loss": True, "packing": False}
