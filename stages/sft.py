"""sft: TRL's SFTTrainer with a LoRA adapter, on the improved replies; loss on reply tokens only.

The simplest way to make a reply the one the model writes: maximise its likelihood. Reads
exactly one of `preferences` (each pair's chosen reply) or `data` (c3po_data: in-scope
revisions, and near/out-of-scope baselines so the adapter keeps its behaviour there);
trainers/sft.py builds and tokenizes the examples.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.stage import Input
from pipeline.training import NON_SEMANTIC_TRAIN_FIELDS, TrainerStage, TrainSettings
from trainers.sft_config import SFTMethodConfig


class SftStageConfig(SFTMethodConfig, TrainSettings):
    """SFT's settings (trainers/sft_config.py) and the shared training settings."""

    fast: bool = Field(
        default=True,
        description="on a CPU, score only the reply tokens with heedful's exact chunked head (trainers/fast_sft.py); "
        "false: TRL's own step",
    )


class SftStage(TrainerStage):
    uses = "sft"
    version = "2"  # 2: c3po data: only the reply learned (revision in scope) must have ended
    summary = "Supervised fine-tuning (TRL) with LoRA on the preferred / revised replies, loss on replies only."
    Config = SftStageConfig
    inputs = {
        "preferences": Input(("preferences",), required=False, doc="prompt/chosen/rejected pairs: learn the chosen reply"),
        "data": Input(("c3po_data",), required=False, doc="c3po_data rows: in-scope revisions + near/out-of-scope baselines"),
    }
    config: SftStageConfig
    non_semantic_fields = NON_SEMANTIC_TRAIN_FIELDS | {"fast"}  # same numbers either way, to rounding

    def run(self):
        from collections import Counter

        from datasets import Dataset
        from trl import SFTConfig

        from trainers.fast_sft import FastSFTTrainer
        from trainers.sft import encode, read_examples

        cfg, ctx = self.config, self.ctx
        examples = read_examples(ctx.input("preferences"), ctx.input("data"), cfg.finished_only, cfg.other_scopes)
        tokenizer = self.tokenizer()
        dataset = Dataset.from_list(encode(tokenizer, examples, cfg.max_length))
        counts = {f"{scope}_rows": n for scope, n in Counter(e["scope"] or "preference" for e in examples).items()}
        ctx.log.info("%d replies to learn (%s)", len(examples), ", ".join(f"{k}={v}" for k, v in counts.items()))

        def build_trainer():
            trainer = self.trl_trainer(FastSFTTrainer, SFTConfig, dataset, tokenizer, fast=cfg.fast)
            if trainer.fast:
                ctx.log.info("only the reply tokens through the LM head (trainers/fast_sft.py)")
            return trainer

        result = self.fit(build_trainer)
        return {**result, "examples": len(examples), **counts}
