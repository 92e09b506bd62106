"""train_reward: train and evaluate a reward model (plove | followup | fine_grained).

The work lives in `reward_models/<kind>.py` (`train(ctx, cfg) -> metrics`); this file is the
stage contract. The output folder loads back with `reward_models.base.load_reward_model`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.report import SECTIONS
from pipeline.stage import Input, Output, Stage
from pipeline.training import NON_SEMANTIC_TRAIN_FIELDS, TrainSettings
from reward_models.report_section import reward_model_section
from reward_models.settings import FineGrainedSettings, FollowupSettings, PLoveSettings

FEEDBACK_KINDS = ("reactions", "span_feedback", "preferences", "followups", "verbal_feedback", "feedback", "prompts")


class TrainRewardConfig(TrainSettings):
    kind: Literal["plove", "followup", "fine_grained"]
    base_model: str | None = Field(default=None, description="alias, folder or hub id ('minilm' = all-MiniLM-L6-v2); default: the stage's model")
    eval_fraction: float = Field(default=0.2, ge=0, lt=1, description="held out when no `eval` input is given")
    split: Literal["random", "group", "time"] = Field(default="group", description="group: by prompt; time: latest held out")
    learning_rate: float = Field(default=2e-4, gt=0)
    full_finetune: bool = Field(default=False, description="train every weight instead of a LoRA adapter (small encoders)")
    plove: PLoveSettings = Field(default_factory=PLoveSettings)
    followup: FollowupSettings = Field(default_factory=FollowupSettings)
    fine_grained: FineGrainedSettings = Field(default_factory=FineGrainedSettings)

    @model_validator(mode="after")
    def _only_own_block(self):
        for other in ("plove", "followup", "fine_grained"):  # settings for another kind are a mistake
            if other != self.kind and getattr(self, other) != type(getattr(self, other))():
                raise ValueError(f"'{other}' settings given but kind is '{self.kind}'")
        return self


class TrainRewardStage(Stage):
    uses = "train_reward"
    summary = "Train a reward model: P[Love], follow-up likelihood (FLR) or fine-grained (dense)."
    Config = TrainRewardConfig
    inputs = {
        "feedback": Input(FEEDBACK_KINDS, doc="reactions (plove), preferences/follow-ups (followup), span feedback (fine_grained)"),
        "eval": Input(FEEDBACK_KINDS, required=False, doc="held-out feedback in the same format (else eval_fraction)"),
        "preferences": Input(("preferences",), required=False, doc="fine_grained completeness pairs (qa-feedback carries its own)"),
    }
    outputs = {"reward_model": Output("reward_model", doc="folder with reward_model.json; load_reward_model() reads it")}
    default_num_cpus = float("inf")
    non_semantic_fields = NON_SEMANTIC_TRAIN_FIELDS

    def run(self):
        import importlib

        module = importlib.import_module(f"reward_models.{self.config.kind}")
        return module.train(self.ctx, self.config)


if reward_model_section not in SECTIONS:
    SECTIONS.append(reward_model_section)
