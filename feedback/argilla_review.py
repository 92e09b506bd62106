"""Which items the loop asks people to review, and why (pure: no Argilla, no model).

A reward model's verdict is least trustworthy where it is least sure (a P[Love] near 0.5,
a preference margin near 0), and where two signals contradict each other (two reward
models, or the reward model and the user's own reaction): one of them is wrong and a
person can say which. `argilla_push` with `select:` sends only those items, each carrying
why it was chosen, so an annotator's time goes where a label teaches the models most.

Scores are columns the `score` stage wrote (its `column`, default `reward`):
- a single reply: the column's value, judged against `boundary` (0.5 for P[Love]);
- a pair (prompt/chosen/rejected, or two replies the preference template pairs up): the
  margin, `<column>_chosen - <column>_rejected` (the score stage's pairs: `score: score`)
  or A - B of the two replies' scores, or the column itself when it already is a margin;
  a margin's boundary is always 0.
The other signal of a disagreement (`against`) is a second score column (its own boundary)
or a reaction (love/like/thumbs_up +, dislike/thumbs_down -, neutral no side, as KTO reads
them) or a true/false label.

Selection: the `band` keeps scores in [lo, hi]; then `low_confidence` ranks by distance
to the boundary (closest first), `disagreement` keeps items whose two signals fall on
opposite sides (a signal on its boundary has no side) ranked by the primary score's
distance (the most confident contradictions first), `all` keeps input order; `top_k`
keeps the first K. Ties break by item id, so the same inputs always select the same items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import DataError

from .argilla_templates import stable_id

ReviewReason = Literal["low_confidence", "disagreement", "all"]
#: metadata the annotator sees on each selected record: (Argilla metadata type, title)
REVIEW_METADATA = {
    "review_reason": ("terms", "Why review this"),
    "review_score": ("float", "Reward-model score (or margin)"),
    "review_detail": ("terms", "What the models said"),
}


class ReviewSelection(BaseModel):
    """`argilla_push`'s `select:` block."""

    model_config = ConfigDict(extra="forbid")
    by: ReviewReason = Field(description="low_confidence | disagreement | all")
    score: str = Field(default="reward", description="the score stage's column; for pairs see the module docstring")
    boundary: float = Field(default=0.5, description="a single reply's decision boundary (P[Love]: 0.5); margins use 0")
    against: str | None = Field(default=None, description="disagreement: a second score column, or `reaction`, or a label")
    against_boundary: float | None = Field(default=None, description="boundary of a numeric `against` (default: `boundary`)")
    band: tuple[float, float] | None = Field(default=None, description="only scores in [lo, hi]")
    top_k: int | None = Field(default=None, ge=1, description="at most K items (see the ranking in the module docstring)")

    @model_validator(mode="after")
    def _coherent(self) -> ReviewSelection:
        if self.band is not None and self.band[0] > self.band[1]:
            raise ValueError(f"band [{self.band[0]}, {self.band[1]}]: lo must not exceed hi")
        if self.by == "low_confidence" and self.band is None and self.top_k is None:
            raise ValueError("low_confidence would select every item: set top_k, band or both")
        if self.by == "disagreement" and not self.against:
            raise ValueError("disagreement needs `against`: a second score column, or `reaction`")
        if self.by != "disagreement" and self.against:
            raise ValueError(f"`against` is only read by `by: disagreement` (this selection is by {self.by})")
        if self.against == self.score:
            raise ValueError(f"`against` and `score` are the same column '{self.score}'")
        return self


@dataclass(frozen=True)
class Candidate:
    """One item's signals: `score` (a reply's score or a pair's margin) against `boundary`,
    and for a disagreement the side of the other signal (+1, -1, 0 = none)."""

    id: str
    score: float
    boundary: float
    what: str
    against_side: int = 0
    against_shown: str = ""

    @property
    def side(self) -> int:
        return _side(self.score - self.boundary)

    @property
    def distance(self) -> float:
        return abs(self.score - self.boundary)


@dataclass(frozen=True)
class Choice:
    """A selected item and the reason its annotator sees."""

    id: str
    reason: ReviewReason
    score: float
    detail: str

    def metadata(self) -> dict[str, Any]:
        return {"review_reason": self.reason, "review_score": self.score, "review_detail": self.detail}


def select(candidates: Sequence[Candidate], cfg: ReviewSelection) -> list[Choice]:
    """The items to review, in review order (see the module docstring)."""
    pool = [c for c in candidates if cfg.band is None or cfg.band[0] <= c.score <= cfg.band[1]]
    if cfg.by == "low_confidence":
        pool.sort(key=lambda c: (c.distance, c.id))
    elif cfg.by == "disagreement":
        pool = [c for c in pool if c.side * c.against_side < 0]
        pool.sort(key=lambda c: (-c.distance, c.id))
    chosen = pool[: cfg.top_k] if cfg.top_k else pool
    return [Choice(c.id, cfg.by, c.score, _detail(c, cfg.by)) for c in chosen]


def _side(x: float) -> int:
    return (x > 0) - (x < 0)


def _detail(c: Candidate, reason: ReviewReason) -> str:
    said = f"{c.what} {c.score:.3g}"
    if reason == "low_confidence":
        return f"{said}: {c.distance:.3g} from the boundary {c.boundary:g}"
    if reason == "disagreement":
        return f"{said} ({'above' if c.side > 0 else 'below'} {c.boundary:g}) vs {c.against_shown}"
    return said


# -- signals from the score stage's rows -------------------------------------------------------


def content_key(row: dict[str, Any]) -> str:
    """What joins a record row to its scored row: the prompt and the reply (or the pair);
    the score stage copies both unchanged."""
    if "chosen" in row and "rejected" in row:
        return stable_id(row.get("prompt"), row.get("chosen"), row.get("rejected"))
    return stable_id(row.get("prompt"), row.get("system_prompt"), row.get("response"))


def candidates(
    sourced: Sequence[tuple[str, tuple[int, ...]]],
    rows: Sequence[dict[str, Any]],
    cfg: ReviewSelection,
    where: str,
    scores: Sequence[dict[str, Any]] | None = None,
    scores_where: str = "scores",
) -> list[Candidate]:
    """A candidate per item (`sourced`: item id + the indices of its rows in `rows`). With
    `scores`, each row is read together with the scores row of the same content (its columns
    win), so the reward can come from there and the user's reaction from the record."""
    by_key: dict[str, tuple[str, dict[str, Any]]] = {}
    for n, srow in enumerate(scores or []):
        by_key.setdefault(content_key(srow), (f"{scores_where} row {n}", srow))
    out = []
    for item_id, indices in sourced:
        signal_rows = []
        for i in indices:
            if scores is None:
                signal_rows.append((f"{where} row {i}", rows[i]))
            elif (hit := by_key.get(content_key(rows[i]))) is not None:
                signal_rows.append((f"{where} row {i} + {hit[0]}", {**rows[i], **hit[1]}))
            else:
                raise DataError(f"{where} row {i}: no row of {scores_where} has the same prompt and reply (scored elsewhere?)")
        out.append(_candidate(item_id, signal_rows, cfg))
    return out


def _candidate(item_id: str, signal_rows: list[tuple[str, dict[str, Any]]], cfg: ReviewSelection) -> Candidate:
    if len(signal_rows) == 2:  # two replies paired into A vs B: the margin A - B
        (at_a, a), (at_b, b) = signal_rows
        score = _number(a, cfg.score, at_a) - _number(b, cfg.score, at_b)
        cand = Candidate(item_id, score, 0.0, f"{cfg.score} margin A-B")
        if cfg.against:
            other = _signal(a, cfg.against, at_a)[0] - _signal(b, cfg.against, at_b)[0]
            cand = _with_against(cand, _side(other), f"{cfg.against} margin A-B {other:.3g}")
        return cand
    ((at, row),) = signal_rows
    if "chosen" in row and "rejected" in row:  # a preference pair: the margin chosen - rejected
        score, what = _margin(row, cfg.score, at)
        cand = Candidate(item_id, score, 0.0, what)
        if cfg.against:
            other, other_what = _margin(row, cfg.against, at)
            cand = _with_against(cand, _side(other), f"{other_what} {other:.3g}")
        return cand
    cand = Candidate(item_id, _number(row, cfg.score, at), cfg.boundary, cfg.score)
    if cfg.against:
        value, numeric = _signal(row, cfg.against, at)
        if numeric:
            bound = cfg.boundary if cfg.against_boundary is None else cfg.against_boundary
            side = _side(value - bound)
            shown = f"{cfg.against} {value:.3g} ({'above' if side > 0 else 'below' if side < 0 else 'on'} {bound:g})"
        else:
            side, shown = _side(value), f"{cfg.against} {row[cfg.against]}"
        cand = _with_against(cand, side, shown)
    return cand


def _with_against(cand: Candidate, side: int, shown: str) -> Candidate:
    return Candidate(cand.id, cand.score, cand.boundary, cand.what, side, shown)


def _margin(row: dict[str, Any], column: str, at: str) -> tuple[float, str]:
    chosen, rejected = f"{column}_chosen", f"{column}_rejected"
    if chosen in row and rejected in row:
        return _number(row, chosen, at) - _number(row, rejected, at), f"{column} margin chosen-rejected"
    if column not in row:
        raise DataError(f"{at}: field '{column}' is missing: a pair needs '{chosen}' and '{rejected}' or a '{column}' margin")
    return _number(row, column, at), f"{column} margin"


def _number(row: dict[str, Any], column: str, at: str) -> float:
    value = row.get(column)
    if value is None:
        raise DataError(f"{at}: field '{column}' is missing (select reads the score stage's column: set select.score)")
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise DataError(f"{at}: field '{column}': expected a number, got {value!r}")
    return float(value)


def _signal(row: dict[str, Any], column: str, at: str) -> tuple[float, bool]:
    """(value, numeric): a number as is; a reaction or true/false label as +1 / -1 / 0."""
    from trainers.kto import reaction_label

    value = row.get(column)
    if value is None:
        raise DataError(f"{at}: field '{column}' is missing (select.against)")
    if isinstance(value, bool):
        return (1.0 if value else -1.0), False
    if isinstance(value, str):
        label = reaction_label(value, f"{at} (select.against '{column}')")
        return (0.0 if label is None else 1.0 if label else -1.0), False
    return _number(row, column, at), True
