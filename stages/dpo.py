"""dpo: TRL DPOTrainer with a PEFT LoRA adapter; the reference is the base with the adapter off.

`rpo_alpha` (RPO) adds the chosen replies' NLL to the loss, on both paths: TRL's own step and
heedful's fast core compute the same term (tests/test_preference_core.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.records import load_rows
from pipeline.stage import Input
from pipeline.training import NON_SEMANTIC_TRAIN_FIELDS, TrainerStage, TrainSettings
from trainers.dpo_config import DPOMethodConfig


class DpoStageConfig(DPOMethodConfig, TrainSettings):
    """DPO's settings (trainers/dpo_config.py) and the shared training settings."""

    fast: bool = Field(default=True, description="heedful's exact packed DPO core (docs/speed.md); false: TRL's own step")
    attention: Literal["auto", "sdpa", "varlen"] = Field(
        default="auto",
        description="the fast core's packed attention: auto (varlen kernels on a CUDA GPU in bf16/fp16, else SDPA), "
        "sdpa, varlen (insist; docs/speed.md)",
    )


def preference_dataset(path, log):
    """Rows with TRL's prompt/chosen/rejected columns (plain text or conversational)."""
    from datasets import Dataset

    rows = load_rows(path, required=["prompt", "chosen", "rejected"], what="preferences")
    from pipeline.chat import matched_pair

    keep = [matched_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    log.info("%d preference pairs", len(keep))
    return Dataset.from_list(keep)


class DpoStage(TrainerStage):
    uses = "dpo"
    summary = "Direct Preference Optimization (TRL) with LoRA."
    Config = DpoStageConfig
    inputs = {"preferences": Input(("preferences",), doc="prompt/chosen/rejected pairs")}
    config: DpoStageConfig
    non_semantic_fields = NON_SEMANTIC_TRAIN_FIELDS | {"fast", "attention"}  # same numbers either way, to rounding

    def run(self):
        from trl import DPOConfig, DPOTrainer

        cfg, ctx = self.config, self.ctx
        dataset = preference_dataset(ctx.input("preferences"), ctx.log)
        if cfg.rpo_alpha is not None:
            ctx.log.info("RPO: DPO loss + %g x NLL per token of the chosen replies", cfg.rpo_alpha)

        def build_trainer():
            if not cfg.fast:
                return self.trl_trainer(DPOTrainer, DPOConfig, dataset)
            from trainers.fastpref.trainer import FastDPOTrainer

            # no explicit gradient_checkpointing: measured per host (trainers/grad_ckpt_probe.py). The reference
            # of every pair cached where the run reads every pair at least once, decided by the trainer from
            # its own args and the pairs TRL kept (`run_passes`); a few steps over many pairs: inside the steps
            trainer = self.trl_trainer(
                FastDPOTrainer,
                DPOConfig,
                dataset,
                probe_checkpointing=cfg.gradient_checkpointing is None,
                model_name=ctx.model,
                attention=cfg.attention,
                ref_cache="auto",
            )
            if trainer.fast:  # on the core (it may have fallen back to TRL's step)
                ctx.log.info("packed DPO core; reference log-probs %s", trainer.reference_origin())
            return trainer

        return {**self.fit(build_trainer), "pairs": len(dataset)}
