"""c3po: learn one verbal feedback without overgeneralizing (trainers/c3po.py), with LoRA.

Reads `c3po_data` rows (scope, prompt, baseline, revised). With `eval_prompts` it also runs
the adherence / overgeneralization evaluation (base, in-context, trained) after training.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output
from pipeline.training import TrainerStage, TrainSettings
from trainers.c3po_config import C3POConfig
from trainers.feedback_eval import EvalSettings, MetricSpec


class C3poConfig(C3POConfig, TrainSettings):
    """C3PO's settings (trainers/c3po_config.py), the shared training settings, and evaluation."""

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


class C3poStage(TrainerStage):
    uses = "c3po"
    # 2: rpo_alpha 1.0 by default (RPO's NLL term on the revisions; 0 is the paper's loss); 3: evaluation.batch_size
    # is fingerprinted (a run made with another one, whose fingerprint left it out, is not taken for this one)
    version = "3"
    summary = "C3PO: DPO on in-scope + NLL/KL constraints on near- and out-of-scope (LoRA)."
    Config = C3poConfig
    #: how the built-in evaluation writes its replies, not what it measures (as evaluate_feedback's); not
    #: evaluation.batch_size: HF generate seeds each batch (seed + b), so replies sampled at a temperature
    #: (evaluation.sampling) change with it, and the evaluation is this stage's output
    non_semantic_fields = TrainerStage.non_semantic_fields | {"evaluation.engine"}
    inputs = {
        "data": Input(("c3po_data",), doc="output of c3po_data (or rows with scope/prompt/baseline/revised)"),
        "adapter": Input(("adapter",), required=False, doc="continue training this adapter (reference = it, frozen)"),
        "eval_prompts": Input(("prompts",), required=False, doc="held-out scoped prompts: evaluate after training"),
    }
    outputs = {
        "adapter": Output("adapter", doc="PEFT LoRA adapter folder"),
        "evaluation": Output("evaluation", required=False, doc="replies and verdicts per condition (with eval_prompts)"),
    }
    config: C3poConfig

    def run(self):
        from pipeline.models import load_causal_lm
        from trainers.c3po import C3POCollator, C3POTrainer, build_examples

        cfg, ctx, adapter = self.config, self.ctx, self.adapter
        scopes = scoped_rows(ctx.input("data"), ctx.log)
        tokenizer = self.tokenizer()
        examples = build_examples(tokenizer, scopes["in_scope"], scopes["near_scope"], scopes["out_of_scope"], cfg.max_length)

        def build_trainer():
            ref_model = (
                None if adapter is None else load_causal_lm(ctx.model, cfg.policy(), adapter=adapter, qlora=cfg.lora.qlora)
            )
            return C3POTrainer(
                model=self.lora_policy(),
                args=self.training_args(),
                train_dataset=examples,
                data_collator=C3POCollator(tokenizer.pad_token_id),
                processing_class=tokenizer,
                method=cfg,
                ref_model=ref_model,
            )

        metrics = self.fit(build_trainer)
        metrics.update({f"{k}_rows": len(v) for k, v in scopes.items()})
        if ctx.input("eval_prompts") is not None:
            metrics.update(self.evaluate())
        return metrics

    def evaluate(self) -> dict[str, float]:
        """The saved adapter against the base and in-context baselines. On CPU its replies come
        from the generation engine (CTranslate2 with the adapter merged where faster). With QLoRA
        or on a GPU the adapter is loaded back as it trained (4-bit base when QLoRA) and HF writes
        the replies: a vLLM engine started inside the training process could find the GPU's
        memory still held by the trainer."""
        import gc

        from pipeline.models import load_causal_lm
        from trainers.c3po_data import metric_from_rows
        from trainers.feedback_eval import evaluate

        cfg = self.config
        gc.collect()  # the finished trainer's cycles (and, on a GPU, its cached blocks below)
        model = None
        if cfg.lora.qlora or cfg.policy().device != "cpu":
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            model = load_causal_lm(self.ctx.model, cfg.policy(), adapter=self.ctx.output("adapter"), qlora=cfg.lora.qlora).eval()
        prompts = load_rows(self.ctx.inputs["eval_prompts"], required=["prompt", "scope"], what="eval prompts")
        metric = cfg.metric or metric_from_rows(prompts)
        feedback = next((r["feedback"] for r in prompts if r.get("feedback")), None)
        if metric is None or not feedback:
            raise ValueError("evaluation needs the feedback and a metric: use c3po_data's eval_prompts or set metric")
        rows, summary = evaluate(
            self.ctx.model,
            self.ctx.output("adapter"),
            prompts,
            feedback,
            metric,
            cfg.evaluation,
            self.ctx.seed,
            cfg.device,
            self.ctx.log,
            model=model,
        )
        save_rows(rows, self.ctx.output("evaluation"))
        return summary
