"""coh: Chain of Hindsight (trainers/coh.py) with LoRA.

Chains come from preference pairs (`preferences`: chosen = positive, rejected = negative)
and/or VerbalFeedback records (`feedback`: good = positive, needs_work = negative; with
`feedback_as_phrase` the critique itself introduces the reply). The adapter folder gets a
`coh.json` naming the positive phrase, so evaluation and generation condition on it.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.artifacts import atomic_write_json
from pipeline.records import load_rows
from pipeline.stage import Input, Output, Stage
from pipeline.training import NON_SEMANTIC_TRAIN_FIELDS, TrainSettings, fit
from trainers.coh import PHRASE_PAIRS, all_phrases


class CohConfig(TrainSettings):
    phrase_pairs: list[tuple[str, str]] = Field(default_factory=lambda: list(PHRASE_PAIRS),
                                                description="(positive, negative) feedback phrases; one pair drawn per chain")
    separator: str = "\n"
    feedback_as_phrase: bool = Field(default=False, description="VerbalFeedback: the critique introduces its reply")
    fcm_min_ratio: float = Field(default=0.0, ge=0, le=1)
    fcm_max_ratio: float = Field(default=0.0, ge=0, le=1, description="forgetful causal masking; the paper uses up to 0.15")
    pretrain_weight: float = Field(default=0.0, ge=0, description="weight of the LM loss on the `pretraining` input")
    learning_rate: float = Field(default=1e-4, gt=0)


class CohStage(Stage):
    uses = "coh"
    summary = "Chain of Hindsight: replies in feedback-phrase chains, loss on replies only (LoRA)."
    Config = CohConfig
    inputs = {
        "preferences": Input(("preferences",), required=False, doc="prompt/chosen/rejected pairs"),
        "feedback": Input(("verbal_feedback",), required=False, doc="VerbalFeedback records with judgment good/needs_work"),
        "pretraining": Input(("texts",), required=False, doc="rows with a `text` field (pretraining regulariser)"),
        "adapter": Input(("adapter",), required=False, doc="continue training this adapter"),
    }
    outputs = {"adapter": Output("adapter", doc="PEFT LoRA adapter folder (+ coh.json: the inference phrase)")}
    default_num_cpus = float("inf")
    non_semantic_fields = NON_SEMANTIC_TRAIN_FIELDS

    def run(self):

        from pipeline.models import load_lora_policy, load_tokenizer
        from trainers.coh import CoHCollator, CoHTrainer, build_examples, chains_from_feedback, chains_from_preferences
        from trainers.feedback_eval import COH_FILE

        cfg: CohConfig = self.config
        ctx = self.ctx
        if cfg.fcm_min_ratio > cfg.fcm_max_ratio:
            raise ValueError(f"fcm_min_ratio {cfg.fcm_min_ratio} is above fcm_max_ratio {cfg.fcm_max_ratio}")
        chains = []
        if ctx.input("preferences") is not None:
            chains += chains_from_preferences(load_rows(ctx.input("preferences"), required=["prompt", "chosen", "rejected"], what="preferences"))
        if ctx.input("feedback") is not None:
            records = load_rows(ctx.input("feedback"), required=["prompt", "response", "judgment"], what="verbal feedback")
            chains += chains_from_feedback(records, cfg.feedback_as_phrase)
        if not chains:
            raise ValueError("coh needs chains: give a `preferences` or `feedback` input (with good/needs_work judgments)")
        pretraining = None
        if cfg.pretrain_weight > 0:
            if ctx.input("pretraining") is None:
                raise ValueError("pretrain_weight > 0 needs a `pretraining` input (rows with a `text` field)")
            pretraining = [str(r["text"]) for r in load_rows(ctx.input("pretraining"), required=["text"], what="pretraining texts")]
        tokenizer = load_tokenizer(ctx.model, padding_side="right")
        examples = build_examples(tokenizer, chains, pretraining)
        ctx.log.info("%d chains (%d with both a positive and a negative reply)", len(examples),
                     sum(bool(e["positive"]) and bool(e["negative"]) for e in examples))
        adapter = ctx.input("adapter")

        def build_trainer():
            from transformers import TrainingArguments

            model = load_lora_policy(ctx.model, cfg.policy(), cfg.lora, adapter)
            collator = CoHCollator(tokenizer, cfg.max_length, cfg.separator, [tuple(p) for p in cfg.phrase_pairs])
            return CoHTrainer(model=model, args=TrainingArguments(**cfg.trainer_kwargs(ctx)), train_dataset=examples,
                              data_collator=collator, processing_class=tokenizer, fcm_min_ratio=cfg.fcm_min_ratio,
                              fcm_max_ratio=cfg.fcm_max_ratio, pretrain_weight=cfg.pretrain_weight)

        metrics = fit(ctx, cfg, build_trainer)
        atomic_write_json(ctx.output("adapter") / COH_FILE, {"phrase": cfg.phrase_pairs[0][0], "stop": all_phrases(cfg.phrase_pairs)})
        metrics["chains"] = len(examples)
        return metrics
