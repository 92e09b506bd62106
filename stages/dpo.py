"""dpo: TRL DPOTrainer with a PEFT LoRA adapter; the reference is the base with the adapter off."""

from __future__ import annotations

from pydantic import Field

from pipeline.records import load_rows
from pipeline.stage import Input, Output, Stage
from pipeline.training import NON_SEMANTIC_TRAIN_FIELDS, TrainSettings, fit


class DpoStageConfig(TrainSettings):
    beta: float = Field(default=0.1, gt=0)
    loss_type: str = "sigmoid"
    learning_rate: float = Field(default=5e-5, gt=0)


def preference_dataset(path, log):
    """Rows with TRL's prompt/chosen/rejected columns (plain text or conversational)."""
    from datasets import Dataset

    rows = load_rows(path, required=["prompt", "chosen", "rejected"], what="preferences")
    keep = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    log.info("%d preference pairs", len(keep))
    return Dataset.from_list(keep)


class DpoStage(Stage):
    uses = "dpo"
    summary = "Direct Preference Optimization (TRL) with LoRA."
    Config = DpoStageConfig
    inputs = {
        "preferences": Input(("preferences",), doc="prompt/chosen/rejected pairs"),
        "adapter": Input(("adapter",), required=False, doc="continue training this adapter"),
    }
    outputs = {"adapter": Output("adapter", doc="PEFT LoRA adapter folder")}
    default_num_cpus = float("inf")
    non_semantic_fields = NON_SEMANTIC_TRAIN_FIELDS

    def run(self):
        from trl import DPOConfig, DPOTrainer

        from pipeline.models import load_causal_lm, load_tokenizer

        cfg: DpoStageConfig = self.config
        ctx = self.ctx
        dataset = preference_dataset(ctx.input("preferences"), ctx.log)
        adapter = ctx.input("adapter")

        def build_trainer():
            model = load_causal_lm(ctx.model, cfg.policy(), adapter=adapter, qlora=cfg.lora.qlora, trainable_adapter=True)
            args = DPOConfig(beta=cfg.beta, loss_type=[cfg.loss_type], max_length=cfg.max_length, **cfg.trainer_kwargs(ctx))
            return DPOTrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=load_tokenizer(ctx.model, padding_side="right"),
                peft_config=None if adapter else cfg.lora.peft_config(),
            )

        metrics = fit(ctx, cfg, build_trainer)
        metrics["pairs"] = len(dataset)
        return metrics
