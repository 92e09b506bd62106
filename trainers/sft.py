"""SFT's data: which reply to train on for each prompt, tokenized so that only the reply is learned.

The loss is TRL's `SFTTrainer` (the `sft` stage); this module decides what it reads:
- `preferences` rows: the chosen reply for its prompt (the reply the feedback preferred);
- `data` rows (c3po_data): the revision for in-scope rows, and the baseline reply (the
  model's own) for near- and out-of-scope rows, so the adapter keeps its behaviour where the
  feedback does not apply (C3PO's regularizer, as plain NLL). With `finished_only` a row
  whose baseline or revision was cut off is left out, the rule `feedback_views` applies for
  the other methods; without it a cut-off reply is trained without an end-of-turn token.

Tokens are the ones C3PO, CUT and CoH train on and the sampler sees: the prompt through
`pipeline.chat.render_ids` (chat template, assistant turn opened), the reply through
`trainers.sequences.completion_ids` (+ end-of-turn when it finished), trimmed by
`fit_length`. Each example carries `completion_mask` (1 on reply tokens), which TRL turns
into labels of -100 on the prompt (`completion_only_loss`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.chat import reply_text
from pipeline.errors import DataError, UserError
from trainers.c3po_data import learned_reply_finished

SCOPES = ("in_scope", "near_scope", "out_of_scope")


def from_preferences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """prompt/chosen/rejected rows -> one example per pair: its prompt and chosen reply."""
    return [{"prompt": row["prompt"], "reply": reply_text(row["chosen"]), "finished": True, "scope": None} for row in rows]


def from_c3po_data(rows: list[dict[str, Any]], finished_only: bool, other_scopes: bool, where: str) -> list[dict[str, Any]]:
    """c3po_data rows -> in-scope revisions (+ near/out-of-scope baselines with `other_scopes`)."""
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        scope = row["scope"]
        if scope not in SCOPES:
            raise DataError(f"{where} row {i}: field 'scope': {scope!r} is not one of {', '.join(SCOPES)}")
        baseline_done, revised_done = bool(row.get("baseline_finished", True)), bool(row.get("revised_finished", True))
        if finished_only and not learned_reply_finished(row):
            continue
        if scope == "in_scope":
            if not row.get("revised"):
                raise DataError(f"{where} row {i}: field 'revised' is missing (an in-scope row needs its revision)")
            out.append({"prompt": row["prompt"], "reply": str(row["revised"]), "finished": revised_done, "scope": scope})
        elif other_scopes:
            out.append({"prompt": row["prompt"], "reply": str(row["baseline"]), "finished": baseline_done, "scope": scope})
    if not any(e["scope"] == "in_scope" for e in out):
        raise DataError(
            f"{where}: no in-scope row left to learn the feedback from"
            + (" (every one was cut off at the sampling limit; set finished_only: false to keep them)" if finished_only else "")
        )
    return out


def read_examples(preferences: Path | None, data: Path | None, finished_only: bool, other_scopes: bool) -> list[dict[str, Any]]:
    """The examples of the one wired input (a clear error when both or neither are)."""
    from pipeline.records import load_rows

    if (preferences is None) == (data is None):
        got = "both" if preferences is not None else "neither"
        raise UserError(
            f"sft: wire exactly one input, `preferences` (train on each pair's chosen reply) or `data` "
            f"(c3po_data rows: in-scope revisions + near/out-of-scope baselines); got {got}"
        )
    if preferences is not None:
        return from_preferences(load_rows(preferences, required=["prompt", "chosen"], what="preferences"))
    assert data is not None
    rows = load_rows(data, required=["scope", "prompt", "baseline"], what="c3po data")
    return from_c3po_data(rows, finished_only, other_scopes, str(data))


def encode(tokenizer, examples: list[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """input_ids and completion_mask per example (see the module docstring)."""
    from pipeline.chat import render_ids
    from trainers.sequences import completion_ids, fit_length, join

    encoded = []
    for example in examples:
        prompt, reply = fit_length(
            render_ids(tokenizer, example["prompt"]),
            completion_ids(tokenizer, example["reply"], example["finished"]),
            max_length,
        )
        input_ids, completion_mask = join(prompt, reply)
        encoded.append({"input_ids": input_ids, "completion_mask": completion_mask})
    return encoded
