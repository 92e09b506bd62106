"""coh: Chain of Hindsight (trainers/coh.py) with LoRA.

Chains come from preference pairs (`preferences`: chosen = positive, rejected = negative)
and/or VerbalFeedback records (`feedback`: good = positive, needs_work = negative; with
`feedback_as_phrase` the critique itself introduces the reply). The adapter folder gets a
`coh.json` naming the positive phrase and the chain's phrases: every engine that samples from the
adapter (generate, simulate, evaluate, the LLM client, `heedful serve`) opens its replies with the
phrase and cuts them where a phrase begins (pipeline/hindsight.py).
"""

from __future__ import annotations

from pydantic import Field

from pipeline.artifacts import atomic_write_json
from pipeline.records import load_rows
from pipeline.stage import Input, Output
from pipeline.training import TrainerStage, TrainSettings
from trainers.coh_config import CoHConfig, all_phrases


class CohConfig(CoHConfig, TrainSettings):
    """CoH's settings (trainers/coh_config.py), the shared training settings, and data options."""

    feedback_as_phrase: bool = Field(default=False, description="VerbalFeedback: the critique introduces its reply")


class CohStage(TrainerStage):
    uses = "coh"
    version = "2"  # 2: forgetful causal masking (fcm_max_ratio > 0) reaches the model; it was silently off on the default path
    summary = "Chain of Hindsight: replies in feedback-phrase chains, loss on replies only (LoRA)."
    Config = CohConfig
    inputs = {
        "preferences": Input(("preferences",), required=False, doc="prompt/chosen/rejected pairs"),
        "feedback": Input(("verbal_feedback",), required=False, doc="VerbalFeedback records with judgment good/needs_work"),
        "pretraining": Input(("texts",), required=False, doc="rows with a `text` field (pretraining regulariser)"),
    }
    outputs = {"adapter": Output("adapter", doc="PEFT LoRA adapter folder (+ coh.json: the inference phrase)")}
    config: CohConfig

    def run(self):
        from pipeline.hindsight import COH_FILE
        from trainers.coh import CoHCollator, CoHTrainer, build_examples, chains_from_feedback, chains_from_preferences

        cfg, ctx = self.config, self.ctx
        chains = []
        if ctx.input("preferences") is not None:
            chains += chains_from_preferences(
                load_rows(ctx.input("preferences"), required=["prompt", "chosen", "rejected"], what="preferences")
            )
        if ctx.input("feedback") is not None:
            records = load_rows(ctx.input("feedback"), required=["prompt", "response", "judgment"], what="verbal feedback")
            chains += chains_from_feedback(records, cfg.feedback_as_phrase)
        if not chains:
            raise ValueError("coh needs chains: give a `preferences` or `feedback` input (with good/needs_work judgments)")
        pretraining = None
        if cfg.pretrain_weight > 0:
            if ctx.input("pretraining") is None:
                raise ValueError("pretrain_weight > 0 needs a `pretraining` input (rows with a `text` field)")
            pretraining = [
                str(r["text"]) for r in load_rows(ctx.input("pretraining"), required=["text"], what="pretraining texts")
            ]
        tokenizer = self.tokenizer()
        examples = build_examples(tokenizer, chains, pretraining)
        ctx.log.info(
            "%d chains (%d with both a positive and a negative reply)",
            len(examples),
            sum(bool(e["positive"]) and bool(e["negative"]) for e in examples),
        )

        def build_trainer():
            return CoHTrainer(
                model=self.lora_policy(),
                args=self.training_args(),
                train_dataset=examples,
                data_collator=CoHCollator(tokenizer, cfg.max_length, cfg),
                processing_class=tokenizer,
                method=cfg,
            )

        metrics = self.fit(build_trainer)
        atomic_write_json(
            ctx.output("adapter") / COH_FILE, {"phrase": cfg.phrase_pairs[0][0], "stop": all_phrases(cfg.phrase_pairs)}
        )
        metrics["chains"] = len(examples)
        return metrics
