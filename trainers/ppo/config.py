"""PPO settings. Defaults reproduce FineGrainedRLHF's qa-feedback run (fine_grained_config.yml):
KL 0.3, lambda 0.95, gamma 1, clip 0.2 (policy and value), value coef 1, 4 PPO epochs and
4 samples per prompt, rewards whitened (scale only), top-k 20 at temperature 0.7, greedy
evaluation, stop after 5 rollouts whose KL to the reference exceeds 10 nats.

Departures, chosen for a LoRA policy on small hardware and said here so nobody has to
diff: learning rate 1e-4 (LoRA needs ~10x the 1e-5 used there for full fine-tuning), an
optimizer step per minibatch instead of one per epoch, 64 new tokens instead of 200.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.models import LoraSettings, config_model
from pipeline.training import TrackingSettings


def _ppo_lora() -> LoraSettings:
    # Dropout off: with it on, the "old" and "new" log-probs of the same weights differ and
    # the PPO ratio starts away from 1 (OpenRLHF disables dropout for the same reason).
    return LoraSettings(dropout=0.0)


class PpoSettings(TrackingSettings):
    """PPO's own settings and their defaults, written once (`report_to` replays the curves to trackers)."""

    # --- schedule
    steps: int = Field(default=20, ge=1, description="rollouts (PPO iterations)")
    prompts_per_step: int = Field(default=4, ge=1)
    samples_per_prompt: int = Field(default=4, ge=1)

    # --- rollouts
    max_new_tokens: int = Field(default=64, ge=1)
    max_prompt_length: int = Field(default=256, ge=8, description="longer prompts keep their last tokens")
    temperature: float = Field(default=0.7, gt=0)
    top_k: int = Field(default=20, ge=0, description="0 = off")
    top_p: float = Field(default=1.0, gt=0, le=1)
    rollout_engine: Literal["hf", "vllm", "auto"] = Field(
        default="hf", description="hf: batched HF generate; vllm: vLLM on a GPU; auto: vLLM when installed with a GPU, else hf"
    )
    rollout_batch_size: int | None = Field(default=None, ge=1, description="prompts per generate call (default: all)")
    missing_eos_penalty: float | None = Field(default=None, description="subtracted from the score of replies cut off")
    system_prompt: str | None = None

    # --- rewards and KL
    kl_coef: float = Field(default=0.3, ge=0)
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    whiten_rewards: bool = True
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)

    # --- updates
    ppo_epochs: int = Field(default=4, ge=1)
    mini_batch_size: int = Field(default=4, ge=1, description="samples per optimizer step")
    micro_batch_size: int | None = Field(default=None, ge=1, description="samples per forward (memory); default = mini batch")
    clip_range: float = Field(default=0.2, gt=0)
    clip_range_value: float = Field(default=0.2, gt=0)
    vf_coef: float = Field(default=1.0, ge=0)
    entropy_coef: float = Field(default=0.0, ge=0)
    whiten_advantages: bool = True
    learning_rate: float = Field(default=1e-4, gt=0)
    value_learning_rate: float | None = Field(default=None, gt=0, description="value head/model; default = learning_rate")
    warmup_steps: int = Field(default=0, ge=0, description="optimizer steps of linear warm-up")
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    target_kl: float | None = Field(
        default=None, gt=0, description="stop this rollout's epochs when the update moved further (per-token approx KL)"
    )
    kl_threshold: float | None = Field(default=10.0, gt=0, description="sequence KL to the reference counted as too high")
    kl_patience: int = Field(default=5, ge=1, description="stop training after this many rollouts over kl_threshold")

    # --- models
    lora: LoraSettings = Field(default_factory=_ppo_lora)
    value_model: str = Field(
        default="head", description="'head' (linear head on the policy trunk) or a model (alias/path) used as a separate critic"
    )

    # --- evaluation, checkpoints
    eval_every: int = Field(default=5, ge=1, description="rollouts between held-out evaluations (also at start and end)")
    eval_prompts: int = Field(default=16, ge=1, description="held-out prompts scored per evaluation")
    eval_temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    save_steps: int = Field(default=5, ge=1, description="rollouts between checkpoints")
    save_total_limit: int = Field(default=2, ge=1)
    device: str | None = None

    @field_validator("value_model")
    @classmethod
    def _local_value_model(cls, value: str, info: ValidationInfo) -> str:
        """A relative folder is the one beside the pipeline config, as its `model:`."""
        return config_model(value, info, keep={"head"}) or value

    def fingerprint_folders(self) -> tuple[str, ...]:
        """A separate critic's model, by content when it is a local folder (pipeline/fingerprint.py)."""
        return ("value_model",) if self.value_model != "head" else ()

    @model_validator(mode="after")
    def _batches_fit(self) -> PpoSettings:
        rollout = self.rollout_size
        if self.mini_batch_size > rollout:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) exceeds the rollout size "
                f"prompts_per_step * samples_per_prompt = {rollout}"
            )
        if self.micro_batch_size and self.mini_batch_size % self.micro_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        return self

    def device_policy(self):
        from pipeline.models import device_policy

        return device_policy(self.device)

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


#: settings that cannot change results (left out of the stage fingerprint)
NON_SEMANTIC_PPO_FIELDS = frozenset({"device", "save_steps", "save_total_limit", "micro_batch_size", "report_to"})
