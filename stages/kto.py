"""kto: TRL's KTOTrainer with a LoRA adapter, from binary signals (thumbs up / down).

The reference is the base with the adapter off (as in dpo). Input rows: TRL's unpaired
prompt/completion/label, reactions (love/like/thumbs_up vs dislike/thumbs_down), or
good/needs_work judgments; trainers/kto.py reads them all.
"""

from __future__ import annotations

from pydantic import model_validator

from pipeline.stage import Input
from pipeline.training import TrainerStage, TrainSettings
from trainers.kto_config import KTOMethodConfig


class KtoStageConfig(KTOMethodConfig, TrainSettings):
    """KTO's settings (trainers/kto_config.py) and the shared training settings."""

    @model_validator(mode="after")
    def _batch_holds_a_mismatched_pair(self) -> KtoStageConfig:
        if self.loss_type == "kto" and self.per_device_train_batch_size < 2:
            raise ValueError(
                "per_device_train_batch_size must be >= 2: KTO estimates its KL term from mismatched pairs in a batch"
            )
        return self


class KtoStage(TrainerStage):
    uses = "kto"
    version = "2"  # 2: class weights balanced for the counts (balance_classes)
    summary = "KTO (TRL) with LoRA from binary feedback: reactions, judgments, labelled replies."
    Config = KtoStageConfig
    inputs = {
        "feedback": Input(
            ("unpaired_preferences", "reactions", "verbal_feedback", "judgments"),
            doc="prompt/completion/label rows, reactions, or good/needs_work judgments",
        )
    }
    config: KtoStageConfig

    def run(self):
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        from trainers.kto import read_feedback, trl_format

        ctx = self.ctx
        rows = read_feedback(ctx.input("feedback"), ctx.log)
        tokenizer = self.tokenizer()
        dataset = Dataset.from_list(trl_format(rows, conversational=bool(getattr(tokenizer, "chat_template", None))))
        desirable = sum(r["label"] for r in rows)
        self.config = self.config.balanced(desirable, len(rows) - desirable)
        weights = {"desirable_weight": self.config.desirable_weight, "undesirable_weight": self.config.undesirable_weight}
        ctx.log.info("class weights: desirable %.3g, undesirable %.3g", *weights.values())

        def build_trainer():
            return self.trl_trainer(KTOTrainer, KTOConfig, dataset, tokenizer)

        return {**self.fit(build_trainer), "desirable": desirable, "undesirable": len(rows) - desirable, **weights}
