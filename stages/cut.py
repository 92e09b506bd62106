"""cut: align with judgments (trainers/cut.py) with LoRA.

Judgments come from VerbalFeedback records (`feedback`), a JSONL/CSV of instruction,
response, judgment, positive (`judgments`), or qa-feedback's error spans (`qa_feedback`).
"""

from __future__ import annotations

from pydantic import Field

from pipeline.records import load_rows
from pipeline.stage import Input
from pipeline.training import TrainerStage, TrainSettings
from trainers.cut_config import CUTConfig


class CutConfig(CUTConfig, TrainSettings):
    """CUT's settings (trainers/cut_config.py), the shared training settings, and data options."""

    qa_with_passages: bool = Field(default=False, description="qa_feedback: put the grounding passages in the instruction")
    max_examples: int | None = Field(default=None, ge=1)


def judgment_rows(ctx, cfg: CutConfig) -> list[dict]:
    from feedback.sources import judgments

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


class CutStage(TrainerStage):
    uses = "cut"
    summary = "CUT: MLE on Align-P/Align-N, unlikelihood on inappropriate Misalign tokens (LoRA)."
    Config = CutConfig
    inputs = {
        "feedback": Input(("verbal_feedback",), required=False, doc="VerbalFeedback records (critique = judgment)"),
        "judgments": Input(("judgments",), required=False, doc="rows: instruction, response, judgment, positive"),
        "qa_feedback": Input(("qa_feedback",), required=False, doc="FineGrainedRLHF qa-feedback JSON"),
    }
    config: CutConfig

    def run(self):
        from trainers.cut import CUTCollator, CUTTrainer, build_examples

        cfg, ctx = self.config, self.ctx
        rows = judgment_rows(ctx, cfg)
        tokenizer = self.tokenizer()
        examples = build_examples(tokenizer, rows, cfg.max_length, cfg.judgment_template)
        positives = sum(bool(r["positive"]) for r in rows)
        ctx.log.info("%d judgments (%d positive, %d negative)", len(rows), positives, len(rows) - positives)

        def build_trainer():
            return CUTTrainer(
                model=self.lora_policy(),
                args=self.training_args(),
                train_dataset=examples,
                data_collator=CUTCollator(tokenizer.pad_token_id),
                processing_class=tokenizer,
                method=cfg,
            )

        metrics = self.fit(build_trainer)
        metrics.update(judgments=len(rows), positive=positives, negative=len(rows) - positives)
        return metrics
