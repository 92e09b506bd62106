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

        from pipeline.models import load_causal_lm
        from trainers.kto import read_feedback, trl_format

        cfg, ctx, adapter = self.config, self.ctx, self.adapter
        rows = read_feedback(ctx.input("feedback"), ctx.log)
        tokenizer = self.tokenizer()
        dataset = Dataset.from_list(trl_format(rows, conversational=bool(getattr(tokenizer, "chat_template", None))))

        def build_trainer():
            model = load_causal_lm(ctx.model, cfg.policy(), adapter=adapter, qlora=cfg.lora.qlora, trainable_adapter=True)
            return KTOTrainer(
                model=model,
                args=self.training_args(KTOConfig, max_length=cfg.max_length, **cfg.trl_kwargs()),
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=None if adapter else cfg.lora.peft_config(),
            )

        desirable = sum(r["label"] for r in rows)
        return {**self.fit(build_trainer), "desirable": desirable, "undesirable": len(rows) - desirable}
