"""validation_split: c3po_data's *training* rows into a part to train on and a validation part.

The arena tunes a small grid per method (docs/arena.md). Tuning on the held-out prompts would
make the reported numbers optimistic, so a grid point is scored on prompts that are neither
trained on nor held out: a seeded share of each scope of the training rows. This stage only
ever reads `c3po_data.train`; the held-out `eval_prompts` are out of its reach by construction.

    fit          the remaining rows (c3po_data), what every method trains on
    validation   the chosen rows as evaluate prompts (prompt, scope, feedback, metric)

Per scope, `round(n * fraction)` rows (at least one) go to validation and at least one stays
to train on, so adherence (in-scope) and overgeneralization (near/out) are both measured.
"""

from __future__ import annotations

import random

from pydantic import Field

from pipeline.stage import Input, Output, Stage, StageConfig
from trainers.feedback_eval import SCOPES

#: the columns an evaluate stage reads from a prompt row (as c3po_data writes its eval_prompts)
PROMPT_COLUMNS = ("id", "prompt", "scope", "category", "feedback", "metric")


class ValidationSplitConfig(StageConfig):
    fraction: float = Field(default=0.25, gt=0, lt=1, description="share of each scope's training rows kept for validation")


class ValidationSplitStage(Stage):
    uses = "validation_split"
    summary = "c3po_data training rows into fit + validation prompts (seeded, per scope): tuning never sees held-out prompts."
    Config = ValidationSplitConfig
    inputs = {"data": Input(("c3po_data",), doc="c3po_data's `train` rows (never its eval_prompts)")}
    outputs = {
        "fit": Output("c3po_data", doc="the training rows left to train on"),
        "validation": Output("prompts", doc="validation prompts: prompt, scope, feedback, metric"),
    }
    config: ValidationSplitConfig

    def run(self):
        from pipeline.records import load_rows, save_rows

        path = self.ctx.input("data")
        rows = load_rows(path, required=["scope", "prompt"], what="c3po data")
        fit, validation = split_by_scope(rows, self.config.fraction, self.ctx.seed, str(path))
        save_rows(fit, self.ctx.output("fit"))
        save_rows([{k: r.get(k) for k in PROMPT_COLUMNS if k in r} for r in validation], self.ctx.output("validation"))
        counts = {f"fit_{s}": sum(r["scope"] == s for r in fit) for s in SCOPES}
        counts.update({f"validation_{s}": sum(r["scope"] == s for r in validation) for s in SCOPES})
        self.ctx.log.info("%s", ", ".join(f"{k}={v}" for k, v in counts.items()))
        return counts


def split_by_scope(rows: list[dict], fraction: float, seed: int, where: str = "c3po data") -> tuple[list[dict], list[dict]]:
    """(fit, validation): per scope a seeded `fraction` (at least one row, never all) to validation."""
    fit: list[dict] = []
    validation: list[dict] = []
    for scope in SCOPES:
        mine = [r for r in rows if r["scope"] == scope]
        if len(mine) < 2:
            from pipeline.errors import DataError

            raise DataError(
                f"{where}: {len(mine)} training rows of scope {scope}; a validation split needs at least 2 "
                "(one to train on, one to validate): give more prompts or drop arena.grid"
            )
        order = list(range(len(mine)))
        random.Random(f"{seed}:{scope}").shuffle(order)
        n = min(len(mine) - 1, max(1, round(len(mine) * fraction)))
        picked = set(order[:n])
        validation += [r for k, r in enumerate(mine) if k in picked]
        fit += [r for k, r in enumerate(mine) if k not in picked]
    return fit, validation
