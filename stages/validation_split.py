"""validation_split: c3po_data's *training* rows into a part to train on and a validation part.

The arena tunes a small grid per method (docs/arena.md). Tuning on the held-out prompts would
make the reported numbers optimistic, so a grid point is scored on prompts that are neither
trained on nor held out: a seeded share of each scope of the training rows. This stage only
ever reads `c3po_data.train`; the held-out `eval_prompts` are out of its reach by construction.

    fit          the remaining rows (c3po_data), what every method trains on
    validation   the chosen rows as evaluate prompts (prompt, scope, feedback, metric)

Per scope, `round(n * fraction)` rows (at least one) go to validation and at least one stays
to train on, so adherence (in-scope) and overgeneralization (near/out) are both measured.
The unit is the *prompt*, as in the `split` stage (`pipeline.prompt_groups`): rows with the
same last user turn (a repeated prompt, several rows of one prompt) go to validation together
or not at all, as close to that count as whole prompts allow -- else a grid point would be
scored partly on prompts it trained on. A prompt found in two scopes goes where the first scope
(in_scope, near_scope, out_of_scope) sent it. With one row per prompt the choice is the same as
a per-row draw (version 1's). Exact repeats among the validation prompts (every column it
writes equal: the same prompt, scope, id, category, feedback and metric) are dropped, the first
kept, so no prompt is scored twice (`pipeline.prompt_groups.distinct_items`; the count is the
`validation_duplicates_dropped` metric).
"""

from __future__ import annotations

from pydantic import Field

from pipeline.errors import DataError
from pipeline.prompt_groups import distinct_items, group_key, pick_groups
from pipeline.stage import Input, Output, Stage, StageConfig
from trainers.feedback_eval import SCOPES

#: the columns an evaluate stage reads from a prompt row (as c3po_data writes its eval_prompts)
PROMPT_COLUMNS = ("id", "prompt", "scope", "category", "feedback", "metric")


class ValidationSplitConfig(StageConfig):
    fraction: float = Field(default=0.25, gt=0, lt=1, description="share of each scope's training rows kept for validation")


class ValidationSplitStage(Stage):
    uses = "validation_split"
    # 2: rows with the same prompt go to one side (no prompt both trained on and validated);
    # 3: exact repeats among the validation prompts are dropped (a prompt is scored once)
    version = "3"
    summary = (
        "c3po_data training rows into fit + validation prompts (seeded, per scope, a prompt's rows together): "
        "tuning never sees held-out prompts."
    )
    Config = ValidationSplitConfig
    inputs = {"data": Input(("c3po_data",), doc="c3po_data's `train` rows (never its eval_prompts)")}
    outputs = {
        "fit": Output("c3po_data", doc="the training rows left to train on"),
        "validation": Output("prompts", doc="validation prompts: prompt, scope, feedback, metric"),
    }
    config: ValidationSplitConfig

    def run(self):
        from pipeline.records import load_located_rows, save_rows

        path = self.ctx.input("data")
        located = load_located_rows(path, required=["scope", "prompt"], what="c3po data")
        rows = [row for _, row in located]
        fit, validation = split_by_scope(rows, self.config.fraction, self.ctx.seed, str(path), [where for where, _ in located])
        # the prompt rows evaluate scores: copies differ in their sampled baselines, not in these
        prompts, repeats = distinct_items([{k: r.get(k) for k in PROMPT_COLUMNS if k in r} for r in validation])
        save_rows(fit, self.ctx.output("fit"))
        save_rows(prompts, self.ctx.output("validation"))
        counts = {f"fit_{s}": sum(r["scope"] == s for r in fit) for s in SCOPES}
        counts.update({f"validation_{s}": sum(r["scope"] == s for r in prompts) for s in SCOPES})
        counts["validation_duplicates_dropped"] = repeats
        self.ctx.log.info("%s", ", ".join(f"{k}={v}" for k, v in counts.items()))
        return counts


def split_by_scope(
    rows: list[dict], fraction: float, seed: int, where: str = "c3po data", places: list[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """(fit, validation): per scope a seeded `fraction` of its rows (at least one row, never all)
    to validation, in whole groups of rows with the same prompt (`group_key`), so that no prompt
    is both trained on and validated. A bad row is a DataError naming it: `places[i]` (`file:line`
    as `load_located_rows` gives it), else `<where> row <n>` from 1."""
    place = places or [f"{where} row {i + 1}" for i in range(len(rows))]
    for i, row in enumerate(rows):
        if row["scope"] not in SCOPES:
            raise DataError(f"{place[i]}: field 'scope': {row['scope']!r} is not one of {', '.join(SCOPES)}")
    keys = [group_key(row, i) for i, row in enumerate(rows)]
    validates: dict[str, bool] = {}  # a prompt's side, once the first scope with rows of it chose
    fit: list[dict] = []
    validation: list[dict] = []
    for scope in SCOPES:
        mine = [i for i, row in enumerate(rows) if row["scope"] == scope]
        if len(mine) < 2:
            raise DataError(
                f"{where}: {len(mine)} training rows of scope {scope}; a validation split needs at least 2 "
                "(one to train on, one to validate): give more prompts or drop arena.grid"
            )
        groups: dict[str, list[int]] = {}
        for i in mine:
            groups.setdefault(keys[i], []).append(i)
        free = [key for key in groups if key not in validates]
        decided = [key for key in groups if key in validates]  # sent by an earlier scope
        already = sum(len(groups[key]) for key in decided if validates[key])
        n = min(len(mine) - 1, max(1, round(len(mine) * fraction)))
        picked = pick_groups(
            [len(groups[key]) for key in free],
            n - already,
            f"{seed}:{scope}",
            min_rows=0 if already else 1,
            keep_one=all(validates[key] for key in decided),  # nothing of this scope trains yet
        )
        validates.update({key: k in picked for k, key in enumerate(free)})
        chosen = [rows[i] for i in mine if validates[keys[i]]]
        rest = [rows[i] for i in mine if not validates[keys[i]]]
        if not chosen or not rest:
            raise DataError(
                f"{where}: the {len(mine)} training rows of scope {scope} ask {len(groups)} different prompts, and the "
                f"split leaves {len(rest)} to train on and {len(chosen)} to validate; a prompt's rows stay on one side, "
                "so each scope needs at least 2 different prompts (one to train on, one to validate): give more prompts "
                "or drop arena.grid"
            )
        validation += chosen
        fit += rest
    return fit, validation
