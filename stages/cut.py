"""cut: align with judgments (trainers/cut.py) with LoRA.

Judgments come from VerbalFeedback records (`feedback`), a JSONL/CSV of instruction,
response, judgment, positive (`judgments`), or qa-feedback's error spans (`qa_feedback`).
"""

from __future__ import annotations

from pydantic import Field

from pipeline.records import load_rows
from pipeline.stage import Input, Output, Stage
from pipeline.training import NON_SEMANTIC_TRAIN_FIELDS, TrainSettings, fit
from trainers.cut import DEFAULT_JUDGMENT_TEMPLATE


class CutConfig(TrainSettings):
    threshold: float = Field(default=1.1, ge=1.0, description="lambda: p(y|x,j)/p(y|x) above it marks a token inappropriate")
    alpha: float = Field(default=0.1, ge=0, description="unlikelihood weight (the authors' default)")
    gamma: float = Field(default=0.0, ge=0, description="dynamic weight exponent on p(y|x,j); 0 = constant alpha")
    judgment_template: str = DEFAULT_JUDGMENT_TEMPLATE
    learning_rate: float = Field(default=1e-4, gt=0)
    qa_with_passages: bool = Field(default=False, description="qa_feedback: put the grounding passages in the instruction")
    max_examples: int | None = Field(default=None, ge=1)


def judgment_rows(ctx, cfg: CutConfig) -> list[dict]:
    from trainers import judgments

    rows: list[dict] = []
    if ctx.input("feedback") is not None:
        from pipeline.schema import rows_to_records

        path = ctx.input("feedback")
        records = rows_to_records("verbal_feedback", load_rows(path, what="verbal feedback"), where=str(path))
        rows += judgments.from_verbal([r.model_dump() for r in records])
    if ctx.input("judgments") is not None:
        path = ctx.input("judgments")
        rows += judgments.normalize(load_rows(path, what="judgments"), str(path))
    if ctx.input("qa_feedback") is not None:
        rows += judgments.from_qa_feedback(ctx.input("qa_feedback"), with_passages=cfg.qa_with_passages)
    if not rows:
        raise ValueError("cut needs judgments: give a `feedback`, `judgments` or `qa_feedback` input")
    return rows[: cfg.max_examples] if cfg.max_examples else rows


class CutStage(Stage):
    uses = "cut"
    summary = "CUT: MLE on Align-P/Align-N, unlikelihood on inappropriate Misalign tokens (LoRA)."
    Config = CutConfig
    inputs = {
        "feedback": Input(("verbal_feedback",), required=False, doc="VerbalFeedback records (critique = judgment)"),
        "judgments": Input(("judgments",), required=False, doc="rows: instruction, response, judgment, positive"),
        "qa_feedback": Input(("qa_feedback",), required=False, doc="FineGrainedRLHF qa-feedback JSON"),
        "adapter": Input(("adapter",), required=False, doc="continue training this adapter"),
    }
    outputs = {"adapter": Output("adapter", doc="PEFT LoRA adapter folder")}
    default_num_cpus = float("inf")
    non_semantic_fields = NON_SEMANTIC_TRAIN_FIELDS

    def run(self):

        from pipeline.models import load_lora_policy, load_tokenizer
        from trainers.cut import CUTCollator, CUTTrainer, build_examples

        cfg: CutConfig = self.config
        ctx = self.ctx
        rows = judgment_rows(ctx, cfg)
        tokenizer = load_tokenizer(ctx.model, padding_side="right")
        examples = build_examples(tokenizer, rows, cfg.max_length, cfg.judgment_template)
        positives = sum(bool(r["positive"]) for r in rows)
        ctx.log.info("%d judgments (%d positive, %d negative)", len(rows), positives, len(rows) - positives)
        adapter = ctx.input("adapter")

        def build_trainer():
            from transformers import TrainingArguments

            model = load_lora_policy(ctx.model, cfg.policy(), cfg.lora, adapter)
            return CUTTrainer(model=model, args=TrainingArguments(**cfg.trainer_kwargs(ctx)), train_dataset=examples,
                              data_collator=CUTCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                              threshold=cfg.threshold, alpha=cfg.alpha, gamma=cfg.gamma)

        metrics = fit(ctx, cfg, build_trainer)
        metrics.update(judgments=len(rows), positive=positives, negative=len(rows) - positives)
        return metrics
