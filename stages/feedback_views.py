"""feedback_views: one verbal feedback's C3PO data, seen the way each method reads feedback.

`c3po_data` rows (scope, prompt, baseline, revised) hold everything the feedback says: the
in-scope baseline is what the user objected to, its revision what they wanted, and the
near-/out-of-scope baselines are replies that were already right. So that every method in the
arena learns from the *same examples*, this stage writes them as
    preferences            in-scope: chosen = revision, rejected = baseline   (dpo, coh)
    judgments              in-scope: the baseline judged negative and the revision positive
                           against the feedback                                (cut)
    unpaired_preferences   revision desirable, in-scope baseline undesirable, and (with
                           `other_scopes`) near/out-of-scope baselines desirable (kto)
Revisions built on replies cut off at the sampling limit teach a model never to stop; with
`finished_only` (default) a row is left out of every view when the reply a method learns to
write from it was cut off: the revision in scope, the baseline near and out of scope. An
in-scope baseline that was cut off stays: it is the rejected, undesirable side.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.stage import Input, Output, Stage, StageConfig
from trainers.c3po_data import learned_reply_finished

POSITIVE_JUDGMENT = "This reply follows the feedback: {feedback}"


class FeedbackViewsConfig(StageConfig):
    finished_only: bool = Field(
        default=True, description="leave out rows whose reply to learn (revision; near/out-of-scope baseline) was cut off"
    )
    other_scopes: bool = Field(default=True, description="kto: near/out-of-scope baselines as desirable replies")
    positive_judgment: str = Field(default=POSITIVE_JUDGMENT, description="cut: the judgment of a revision ({feedback})")


class FeedbackViewsStage(Stage):
    uses = "feedback_views"
    version = "2"  # 2: an in-scope row whose baseline was cut off but whose revision ends is kept
    summary = "C3PO data as preferences, judgments and unpaired labels: the same examples for every method."
    Config = FeedbackViewsConfig
    inputs = {"data": Input(("c3po_data",), doc="c3po_data rows: scope, prompt, baseline, revised, feedback")}
    outputs = {
        "preferences": Output("preferences", doc="prompt / chosen (revision) / rejected (baseline)"),
        "judgments": Output("judgments", doc="instruction / response / judgment / positive"),
        "unpaired": Output("unpaired_preferences", doc="prompt / completion / label"),
    }

    def run(self):
        from pipeline.records import load_located_rows, save_rows

        cfg: FeedbackViewsConfig = self.config
        path = self.ctx.input("data")
        located = load_located_rows(path, required=["scope", "prompt", "baseline"], what="c3po data")
        rows = [row for _, row in located]
        views = build_views(rows, cfg, str(path), [where for where, _ in located])
        for name, items in views.items():
            save_rows(items, self.ctx.output(name))
        kept = sum(r["scope"] == "in_scope" for r in rows) - len(views["preferences"])
        self.ctx.log.info("%s", ", ".join(f"{k}={len(v)}" for k, v in views.items()))
        return {**{k: len(v) for k, v in views.items()}, "in_scope_left_out": kept}


def build_views(
    rows: list[dict], cfg: FeedbackViewsConfig, where: str = "c3po data", places: list[str] | None = None
) -> dict[str, list[dict]]:
    """The three views of `rows` (see the module docstring). A bad row is a DataError naming it:
    `places[i]` (`file:line` as `load_located_rows` gives it), else `<where> row <n>` from 1."""
    from pipeline.errors import DataError

    place = places or [f"{where} row {i + 1}" for i in range(len(rows))]
    prefs, judgments, unpaired = [], [], []
    for i, row in enumerate(rows):
        if cfg.finished_only and not learned_reply_finished(row):
            continue
        prompt, baseline, scope = str(row["prompt"]), str(row["baseline"]), row["scope"]
        feedback = str(row.get("feedback") or "")
        if scope == "in_scope":
            revised = str(row.get("revised") or "")
            if not revised:
                raise DataError(f"{place[i]}: in-scope row has no 'revised' reply")
            if not feedback:
                raise DataError(f"{place[i]}: field 'feedback' is missing (c3po_data writes it)")
            prefs.append({"prompt": prompt, "chosen": revised, "rejected": baseline})
            judgments.append({"instruction": prompt, "response": baseline, "judgment": feedback, "positive": False})
            judgments.append(
                {
                    "instruction": prompt,
                    "response": revised,
                    "judgment": cfg.positive_judgment.format(feedback=feedback),
                    "positive": True,
                }
            )
            unpaired.append({"prompt": prompt, "completion": revised, "label": True})
            unpaired.append({"prompt": prompt, "completion": baseline, "label": False})
        elif cfg.other_scopes:
            unpaired.append({"prompt": prompt, "completion": baseline, "label": True})
    if not prefs:
        raise DataError(
            f"{where}: no in-scope row left: every baseline or revision was cut off at the sampling limit "
            f"(raise c3po_data's baseline_sampling.max_new_tokens, set its trim_cut_off: true, or set finished_only: false)"
        )
    return {"preferences": prefs, "judgments": judgments, "unpaired": unpaired}
