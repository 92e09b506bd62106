"""train_reward: train and evaluate a reward model of any trainable kind.

Kinds register themselves (`reward_models.base.register_kind`): each `reward_models/<kind>.py`
holds its settings block and `train(ctx, cfg) -> metrics`, so `kind`'s choices and the
per-kind blocks of the config come from that registry (plove, followup, fine_grained today).
This file is the stage contract. The output folder loads back with
`reward_models.base.load_reward_model`.

`init` (optional): a reward model folder to continue instead of a fresh start (its LoRA
adapter and head, or its full weights; per aspect for fine_grained). It must be of the same
kind and base model (checked here, once, for every kind); the closed loop uses it to refresh
a reward model round after round on all feedback so far (docs/loop.md#reward-models-refreshed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, Field, ValidationInfo, create_model, field_validator, model_validator

from pipeline.models import config_model
from pipeline.schema import KINDS
from pipeline.stage import Input, Output, Stage
from pipeline.training import NON_SEMANTIC_TRAIN_FIELDS, TrainSettings
from reward_models.base import check_init, record_init, trainable_kinds
from reward_models.common import ENCODER_ALIASES

#: every feedback record kind, a mixed `feedback` file, or prompts that carry feedback (qa-feedback)
FEEDBACK_KINDS = (*KINDS, "feedback", "prompts")
REWARD_KINDS = trainable_kinds()


class _TrainRewardSettings(TrainSettings):
    """What every kind shares; `kind` and one settings block per kind are added from the registry."""

    base_model: str | None = Field(
        default=None, description="alias, folder or hub id ('minilm' = all-MiniLM-L6-v2); default: the stage's model"
    )
    eval_fraction: float = Field(default=0.2, ge=0, lt=1, description="held out when no `eval` input is given")
    split: Literal["random", "group", "time"] = Field(default="group", description="group: by prompt; time: latest held out")
    learning_rate: float = Field(default=2e-4, gt=0)
    full_finetune: bool = Field(default=False, description="train every weight instead of a LoRA adapter (small encoders)")

    @field_validator("base_model")
    @classmethod
    def _local_base(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A relative folder is the one beside the pipeline config, as its `model:`."""
        return config_model(value, info, keep=ENCODER_ALIASES)

    def fingerprint_folders(self) -> tuple[str, ...]:
        """The base model, by content when it is a local folder (pipeline/fingerprint.py)."""
        return ("base_model",) if self.base_model not in ENCODER_ALIASES else ()

    @model_validator(mode="after")
    def _only_own_block(self):
        kind = self.kind
        for other, spec in REWARD_KINDS.items():  # settings for another kind are a mistake
            if other != kind and getattr(self, other) != spec.settings():
                raise ValueError(f"'{other}' settings given but kind is '{kind}'")
        return self


TrainRewardConfig = create_model(  # type: ignore[call-overload]
    "TrainRewardConfig",
    __base__=_TrainRewardSettings,
    __module__=__name__,
    kind=(Literal[tuple(REWARD_KINDS)], Field(description="; ".join(f"{n}: {k.summary}" for n, k in REWARD_KINDS.items()))),
    # trainable kinds always have settings (trainable_kinds filters on it)
    **{
        name: (spec.settings, Field(default_factory=cast("type[BaseModel]", spec.settings)))
        for name, spec in REWARD_KINDS.items()
    },
)


class TrainRewardStage(Stage):
    uses = "train_reward"
    summary = "Train a reward model: P[Love], follow-up likelihood (FLR) or fine-grained (dense)."
    version = "2"  # 2: the held-out split (split: group) by a hash of each prompt, stable as the loop's pool grows
    Config = TrainRewardConfig
    inputs = {
        "feedback": Input(
            FEEDBACK_KINDS, doc="reactions (plove), preferences/follow-ups (followup), span feedback (fine_grained)"
        ),
        "eval": Input(FEEDBACK_KINDS, required=False, doc="held-out feedback in the same format (else eval_fraction)"),
        "preferences": Input(
            ("preferences",), required=False, doc="fine_grained completeness pairs (qa-feedback carries its own)"
        ),
        "init": Input(
            ("reward_model",), required=False, doc="continue this reward model (same kind and base) instead of a fresh one"
        ),
    }
    outputs = {"reward_model": Output("reward_model", doc="folder with reward_model.json; load_reward_model() reads it")}
    default_num_cpus = float("inf")
    non_semantic_fields = NON_SEMANTIC_TRAIN_FIELDS | {"followup.fast"}  # how FLR fine-tunes, not what: same numbers

    def run(self):
        init = self.ctx.input("init")
        if init is not None:
            check_init(init, self.config.kind, self.config.base_model or self.ctx.model)
            self.ctx.log.info("continuing the reward model %s", init)
        metrics = REWARD_KINDS[self.config.kind].train(self.ctx, self.config)
        if init is not None:
            record_init(self.ctx.output("reward_model"), init)
        return metrics

    @classmethod
    def report_section(cls, run_root: Path, manifests: dict[str, dict[str, Any]]) -> str | None:
        from reward_models.report_section import reward_model_section

        return reward_model_section(run_root, manifests)
