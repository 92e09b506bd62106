"""Per-kind settings of the `train_reward` stage (pydantic only: importing this stays fast).

Kept apart from the model code so that validating a pipeline never imports torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.stage import StageConfig

ASPECTS = ("relevance", "factuality", "completeness")
#: FineGrainedRLHF's defaults (Wu et al. 2023, qa-feedback): reward magnitude per aspect
DEFAULT_WEIGHTS = {"relevance": 0.3, "factuality": 0.5, "completeness": 0.3}
FLR_ASPECTS = ("understanding", "relevance", "correctness", "engagingness", "informativeness", "instruction_following")


class PLoveSettings(StageConfig):
    """P[Love]: a classifier of 'this reply gets a positive reaction' (RLUF)."""

    positive: list[str] = Field(default_factory=lambda: ["love"], description="reaction values that count as positive")
    class_weighting: Literal["balanced", "none"] = Field(
        default="balanced", description="balanced: positives weighted by #neg/#pos in the loss (the offset is undone at scoring)")
    max_per_user: int | None = Field(default=200, ge=1, description="cap on training examples per user id")
    output: Literal["probability", "logit"] = "probability"
    bins: int = Field(default=10, ge=2, le=50, description="calibration bins (ECE, reliability plot)")
    tfidf_baseline: bool = Field(default=True, description="also fit a TF-IDF logistic regression as a baseline")


class FollowupSettings(StageConfig):
    """FLR: log-likelihood of positive minus negative user follow-ups after the reply."""

    followups: str = Field(default="data:followups/flr_followups.json", description="follow-up lists (data: ref or path)")
    aspects: list[str] | None = Field(default=None, description=f"subset of {', '.join(FLR_ASPECTS)}; default all")
    per_aspect: int | None = Field(default=None, ge=1, description="use the first N follow-ups per aspect and polarity")
    include_context: bool = Field(default=False, description="keep system messages (e.g. retrieved passages) in the prefix")
    max_prefix_tokens: int = Field(default=1024, ge=16)
    batch_size: int = Field(default=4, ge=1, description="replies per forward pass")
    finetune: bool = Field(default=False, description="fine-tune the follow-up LM on natural-language feedback (LoRA)")
    max_eval_prompts: int | None = Field(default=60, ge=1, description="cap on held-out prompts scored for pairwise accuracy")

    @field_validator("aspects")
    @classmethod
    def _known_aspects(cls, value):
        if value is not None:
            unknown = [a for a in value if a not in FLR_ASPECTS]
            if unknown:
                raise ValueError(f"unknown aspect(s) {unknown}: expected some of {list(FLR_ASPECTS)}")
        return value


class FineGrainedSettings(StageConfig):
    """FineGrainedRLHF: one token classifier per span aspect + a holistic completeness RM."""

    aspects: list[Literal["relevance", "factuality", "completeness"]] = Field(default_factory=lambda: list(ASPECTS))
    segmenters: dict[str, str] = Field(
        default_factory=lambda: {"relevance": "subsentence", "factuality": "sentence"},
        description="segmenter per span aspect: sentence | subsentence | newline | whole")
    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    context: dict[str, bool] = Field(
        default_factory=lambda: {"relevance": False, "factuality": True, "completeness": False},
        description="include the prompt's context (system messages, e.g. passages) in the RM input")
    min_span_words: int = Field(default=5, ge=0, description="ignore non-factual error spans shorter than this (paper App. D)")
    mark_token: str | None = Field(default=None, description="label token after each segment; default the RM's sep/eos token")
    class_weighting: Literal["balanced", "none"] = "balanced"

    @field_validator("segmenters")
    @classmethod
    def _known_segmenters(cls, value):
        from .segments import SEGMENTERS

        for aspect, name in value.items():
            if name not in SEGMENTERS:
                raise ValueError(f"{aspect}: unknown segmenter '{name}': expected one of {', '.join(SEGMENTERS)}")
        return value


class ObjectiveSpec(StageConfig):
    """One reward model in a weighted combination."""

    path: str = Field(description="reward model folder (reward_model.json inside)")
    weight: float = 1.0
    name: str | None = Field(default=None, description="label in logs; default the folder's kind")
    normalize: bool = Field(default=True, description="z-score with running mean/std before weighting")


class CombineSettings(StageConfig):
    """Weighted sum of reward models, each z-scored with running statistics (see combine.py)."""

    objectives: list[ObjectiveSpec] = Field(min_length=1)
    clip: float | None = Field(default=5.0, gt=0, description="clip each z-score to [-clip, clip]")
    max_share: float | None = Field(
        default=0.75, gt=0, le=1,
        description="cap on one objective's share of the batch's total |weighted reward| (guard against one dominating)")
