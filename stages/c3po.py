"""c3po: learn one verbal feedback without overgeneralizing (trainers/c3po.py), with LoRA.

Reads `c3po_data` rows (scope, prompt, baseline, revised). With `eval_prompts` it also runs
the adherence / overgeneralization evaluation (base, in-context, trained) after training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output, Stage
from pipeline.training import NON_SEMANTIC_TRAIN_FIELDS, TrainSettings, fit
from trainers.feedback_eval import EvalSettings, MetricSpec


class C3poConfig(TrainSettings):
    beta: float = Field(default=0.1, gt=0)
    sigma_soft: float = Field(default=0.2, ge=0, description="weight of the out-of-scope constraint")
    sigma_hard: float = Field(default=0.1, ge=0, description="weight of the near-scope constraint")
    regularizer: Literal["nll", "kl"] = Field(default="nll", description="nll of the original replies, or KL to the reference")
    kl_temperature: float = Field(default=1.0, gt=0)
    reduction: Literal["sequence", "token"] = Field(default="sequence", description="constraint summed per reply (paper) or token mean")
    learning_rate: float = Field(default=1e-4, gt=0)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    metric: MetricSpec | None = Field(default=None, description="evaluation metric; default: the one c3po_data stored")


def scoped_rows(path, log):
    rows = load_rows(path, required=["scope", "prompt", "baseline"], what="c3po data")
    by_scope = {s: [r for r in rows if r["scope"] == s] for s in ("in_scope", "near_scope", "out_of_scope")}
    for i, row in enumerate(by_scope["in_scope"]):
        if not row.get("revised"):
            raise ValueError(f"{path}: in-scope row {i} ({row['prompt'][:40]!r}) has no 'revised' reply")
    log.info("c3po data: %s", ", ".join(f"{k}={len(v)}" for k, v in by_scope.items()))
    return by_scope


class C3poStage(Stage):
    uses = "c3po"
    summary = "C3PO: DPO on in-scope + NLL/KL constraints on near- and out-of-scope (LoRA)."
    Config = C3poConfig
    inputs = {
        "data": Input(("c3po_data",), doc="output of c3po_data (or rows with scope/prompt/baseline/revised)"),
        "adapter": Input(("adapter",), required=False, doc="continue training this adapter (reference = it, frozen)"),
        "eval_prompts": Input(("prompts",), required=False, doc="held-out scoped prompts: evaluate after training"),
    }
    outputs = {
        "adapter": Output("adapter", doc="PEFT LoRA adapter folder"),
        "evaluation": Output("evaluation", required=False, doc="replies and verdicts per condition (with eval_prompts)"),
    }
    default_num_cpus = float("inf")
    non_semantic_fields = NON_SEMANTIC_TRAIN_FIELDS

    def run(self):

        from pipeline.models import load_causal_lm, load_lora_policy, load_tokenizer
        from trainers.c3po import C3POCollator, C3POTrainer, build_examples

        cfg: C3poConfig = self.config
        ctx = self.ctx
        scopes = scoped_rows(ctx.input("data"), ctx.log)
        tokenizer = load_tokenizer(ctx.model, padding_side="right")
        examples = build_examples(tokenizer, scopes["in_scope"], scopes["near_scope"], scopes["out_of_scope"], cfg.max_length)
        adapter = ctx.input("adapter")
        trainers = []

        def build_trainer():
            from transformers import TrainingArguments

            policy = cfg.policy()
            model = load_lora_policy(ctx.model, policy, cfg.lora, adapter)
            ref_model = None if adapter is None else load_causal_lm(ctx.model, policy, adapter=adapter, qlora=cfg.lora.qlora)
            trainer = C3POTrainer(
                model=model, args=TrainingArguments(**cfg.trainer_kwargs(ctx)), train_dataset=examples,
                data_collator=C3POCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                beta=cfg.beta, sigma_soft=cfg.sigma_soft, sigma_hard=cfg.sigma_hard,
                regularizer=cfg.regularizer, kl_temperature=cfg.kl_temperature, reduction=cfg.reduction, ref_model=ref_model,
            )
            trainers.append(trainer)
            return trainer

        metrics = fit(ctx, cfg, build_trainer)
        metrics.update({f"{k}_rows": len(v) for k, v in scopes.items()})
        if ctx.input("eval_prompts") is not None:
            # multi-worker training builds its trainers elsewhere: evaluate the saved adapter then
            metrics.update(self.evaluate(trainers[-1].model if trainers else None))
        return metrics

    def evaluate(self, model=None) -> dict[str, float]:
        from stages.c3po_data import metric_from_rows
        from trainers.feedback_eval import evaluate

        cfg: C3poConfig = self.config
        prompts = load_rows(self.ctx.input("eval_prompts"), required=["prompt", "scope"], what="eval prompts")
        metric = cfg.metric or metric_from_rows(prompts)
        feedback = next((r["feedback"] for r in prompts if r.get("feedback")), None)
        if metric is None or not feedback:
            raise ValueError("evaluation needs the feedback and a metric: use c3po_data's eval_prompts or set metric")
        adapter = None
        if model is None:
            adapter = self.ctx.output("adapter")
        else:
            model.eval()
        rows, summary = evaluate(self.ctx.model, adapter, prompts, feedback, metric, cfg.evaluation, self.ctx.seed,
                                 cfg.device, self.ctx.log, model=model)
        save_rows(rows, self.ctx.output("evaluation"))
        return summary
