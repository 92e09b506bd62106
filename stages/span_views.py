"""span_views: human span feedback (FineGrainedRLHF's qa-feedback) seen the way each method reads it.

Each qa-feedback question carries a model answer (`prediction 1`), the error spans annotators
marked in it, and their corrected answer. The feedback readers already turn that into
judgments (feedback/sources/judgments.py: `from_qa_feedback`: the answer with a written
judgment of its spans, negative when anything was marked, and the correction as a positive
example). So that every method in the arena learns from the same questions, this stage splits
the questions (seeded) and writes, from those judgments,

    preferences    corrected answer chosen over prediction 1 when annotators marked errors
                   (dpo, coh, sft: the chosen reply)
    judgments      the judgment rows themselves                                      (cut)
    unpaired       each judged reply with its label: good vs needs work                 (kto)
    train_spans    the training questions' error spans as span_feedback records (prompted as
                   above), for a fine-grained reward model that never saw a held-out question
                   (arena_spans.yaml trains its relevance RM on them: it rewards ppo and
                   scores every row of the table)
    eval_prompts / eval_answers          held-out questions, and their reference answer
    validation_prompts / validation_answers   (with `validation_fraction`) training questions
                   kept out of the views for tuning a grid (docs/arena.md)

The reference answer is the annotators' correction (or prediction 1 when they found nothing
wrong): an evaluate stage given `eval_answers` as its `general` set reports, as `ref_loglik`,
how likely a model finds the corrected answers to questions it never trained on. The held-out
questions do not depend on `validation_fraction`: validation is drawn from the rest.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.stage import Input, Output, Stage, StageConfig

EMPTY_PROMPT = {"id": "", "prompt": ""}
EMPTY_ANSWER = {"id": "", "prompt": "", "answer": ""}


class SpanViewsConfig(StageConfig):
    held_out_fraction: float = Field(default=0.25, gt=0, lt=1, description="share of the questions held out for evaluation")
    validation_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="share of the remaining (training) questions kept for tuning, not training"
    )
    max_questions: int | None = Field(default=None, ge=2, description="use the first N questions of the file")
    with_passages: bool = Field(default=False, description="put the grounding passages in the prompt (long prompts)")


class SpanViewsStage(Stage):
    uses = "span_views"
    version = "2"  # 2: train_spans (a views folder from before has none for the reward model to read)
    summary = "qa-feedback spans as preferences, judgments and good/needs-work labels, with held-out questions."
    Config = SpanViewsConfig
    inputs = {"qa_feedback": Input(("qa_feedback",), doc="FineGrainedRLHF qa-feedback JSON (question, prediction 1, feedback)")}
    outputs = {
        "preferences": Output("preferences", doc="prompt / chosen (correction) / rejected (prediction 1)"),
        "judgments": Output("judgments", doc="instruction / response / judgment / positive"),
        "unpaired": Output("unpaired_preferences", doc="prompt / completion / label"),
        "train_spans": Output("span_feedback", doc="the training questions' error spans (fine_grained reward models)"),
        "eval_prompts": Output("prompts", doc="held-out questions"),
        "eval_answers": Output("prompts", doc="held-out questions with their reference answer (prompt / answer)"),
        "validation_prompts": Output("prompts", doc="validation questions (empty without validation_fraction)"),
        "validation_answers": Output("prompts", doc="validation questions with their reference answer"),
    }
    config: SpanViewsConfig

    def run(self):
        from pipeline.records import save_rows

        cfg: SpanViewsConfig = self.config
        path = self.ctx.input("qa_feedback")
        assert path is not None  # a required input
        questions = judge(path, cfg.max_questions, cfg.with_passages)
        parts = split_questions(len(questions), cfg.held_out_fraction, cfg.validation_fraction, self.ctx.seed, str(path))
        judged = {name: [questions[i] for i in index] for name, index in parts.items()}
        views = training_views(judged["train"], str(path))
        for name, items in views.items():
            save_rows(items, self.ctx.output(name))
        spans = training_spans(path, questions, parts["train"])
        save_rows(spans, self.ctx.output("train_spans"))
        for part, prefix in (("held_out", "eval"), ("validation", "validation")):
            prompts, answers = prompts_and_answers(judged[part])
            save_rows(prompts, self.ctx.output(f"{prefix}_prompts"), empty_like=EMPTY_PROMPT)
            save_rows(answers, self.ctx.output(f"{prefix}_answers"), empty_like=EMPTY_ANSWER)
        counts = {f"questions_{name}": len(index) for name, index in parts.items()}
        counts.update({name: len(items) for name, items in views.items()})
        counts["train_spans"] = len(spans)
        self.ctx.log.info("%s", ", ".join(f"{k}={v}" for k, v in counts.items()))
        return counts


def split_questions(n: int, held_out: float, validation: float, seed: int, where: str) -> dict[str, list[int]]:
    """Question indices per part: held_out first (independent of `validation`), then validation from the rest."""
    order = list(range(n))
    random.Random(f"{seed}:held_out").shuffle(order)
    n_held = max(1, round(n * held_out))
    held, rest = sorted(order[:n_held]), order[n_held:]
    random.Random(f"{seed}:validation").shuffle(rest)
    n_val = max(1, round(len(rest) * validation)) if validation > 0 else 0
    val, train = sorted(rest[:n_val]), sorted(rest[n_val:])
    if not train:
        raise ValueError(f"{where}: {n} questions leave none to train on ({n_held} held out, {n_val} for validation)")
    return {"train": train, "held_out": held, "validation": val}


def judge(path: Path, limit: int | None, with_passages: bool) -> list[list[dict[str, Any]]]:
    """Per question, in file order: its judgment rows (prediction 1, then the correction if any),
    as `from_qa_feedback` writes them (its errors name the file and the item)."""
    from feedback.sources.judgments import from_qa_feedback

    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in from_qa_feedback(Path(path), with_passages=with_passages, limit=limit):
        grouped.setdefault(str(row["id"]).removesuffix("-corrected"), []).append(row)
    return list(grouped.values())


def training_views(questions: list[list[dict[str, Any]]], where: str) -> dict[str, list[dict[str, Any]]]:
    prefs, judgments, unpaired = [], [], []
    for rows in questions:
        answer, correction = rows[0], (rows[1] if len(rows) > 1 else None)
        if correction is not None and not answer["positive"]:
            prefs.append({"prompt": answer["instruction"], "chosen": correction["response"], "rejected": answer["response"]})
        for row in rows:
            judgments.append(row)
            unpaired.append({"prompt": row["instruction"], "completion": row["response"], "label": bool(row["positive"])})
    if not prefs:
        raise ValueError(f"{where}: no training question has marked errors and a correction: no preference pair to learn from")
    return {"preferences": prefs, "judgments": judgments, "unpaired": unpaired}


def training_spans(path: Path, questions: list[list[dict[str, Any]]], train: list[int]) -> list[dict[str, Any]]:
    """The training questions' spans as span_feedback records (qa_spans: prediction 1 and its marked
    errors), prompted exactly as the other views prompt them (the judged instruction: the question, and
    its passages only `with_passages`), so the reward model scores the prompts it was trained on."""
    import json

    from feedback.sources.qa_feedback import qa_spans

    items = json.loads(Path(path).read_text(encoding="utf-8"))  # read fine once already (judge)
    records = qa_spans([items[i] for i in train], str(path), numbers=train)  # no held-out item is read
    return [
        record.model_copy(update={"prompt": questions[i][0]["instruction"]}).model_dump(mode="json")
        for i, record in zip(train, records)
    ]


def prompts_and_answers(questions: list[list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prompt rows, and prompt/answer rows whose answer is the correction (else an unmarked prediction 1)."""
    prompts, answers = [], []
    for rows in questions:
        answer, correction = rows[0], (rows[1] if len(rows) > 1 else None)
        prompts.append({"id": answer["id"], "prompt": answer["instruction"]})
        reference = correction or (answer if answer["positive"] else None)
        if reference is not None:
            answers.append({"id": answer["id"], "prompt": answer["instruction"], "answer": reference["response"]})
    return prompts, answers
