"""CoHConfig: Chain of Hindsight's own settings and their defaults, written once
(trainers/coh.py's `CoHTrainer` and `CoHCollator` take it; the `coh` stage's config
subclasses it). Imports pydantic only.

Defaults: the paper's five phrase pairs (the first positive phrase conditions inference),
no forgetful causal masking (the paper goes up to 0.15), no pretraining term; learning rate
1e-4 for LoRA.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.stage import StageConfig

#: (positive, negative) paraphrase pairs; the first positive phrase is used at inference
PHRASE_PAIRS: list[tuple[str, str]] = [
    ("A helpful answer:", "An unhelpful answer:"),
    ("A good answer:", "A bad answer:"),
    ("A better answer:", "A worse answer:"),
    ("The following is a helpful answer:", "The following is an unhelpful answer:"),
    ("A more preferred answer:", "A less preferred answer:"),
]
#: introduces a reply by its own critique (`feedback_as_phrase`)
FEEDBACK_PHRASE = "Feedback: {feedback}\nAnswer:"


def all_phrases(pairs=PHRASE_PAIRS) -> list[str]:
    """Every feedback phrase: where a reply generated after the positive one must stop."""
    return [p for pair in pairs for p in pair]


class CoHConfig(StageConfig):
    """How chains are written and which regularisers apply."""

    phrase_pairs: list[tuple[str, str]] = Field(
        default_factory=lambda: list(PHRASE_PAIRS), description="(positive, negative) feedback phrases; one pair drawn per chain"
    )
    separator: str = "\n"
    fcm_min_ratio: float = Field(default=0.0, ge=0, le=1)
    fcm_max_ratio: float = Field(default=0.0, ge=0, le=1, description="forgetful causal masking; the paper uses up to 0.15")
    pretrain_weight: float = Field(default=0.0, ge=0, description="weight of the LM loss on pretraining text")
    learning_rate: float = Field(default=1e-4, gt=0)

    @model_validator(mode="after")
    def _fcm_range(self) -> CoHConfig:
        if self.fcm_min_ratio > self.fcm_max_ratio:
            raise ValueError(f"fcm_min_ratio {self.fcm_min_ratio} is above fcm_max_ratio {self.fcm_max_ratio}")
        if not self.phrase_pairs:
            raise ValueError("phrase_pairs must name at least one (positive, negative) pair")
        return self
