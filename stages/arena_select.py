"""arena_select: pick one grid point of a method by its validation scores, and pass its adapter on.

The arena tunes a small grid per method (docs/arena.md: "Tuning grid"). Each grid point is an
ordinary training stage, and an ordinary `evaluate` stage scores it on the *validation* prompts
(training prompts nobody trains on). This stage reads those validation summaries, chooses, and
copies the chosen adapter to its own `adapter` output, which the held-out evaluation reads.

Why a stage, and not a choice made while expanding the arena file after a first run: the
pipeline stays one static graph, so skipping, resuming, Ray scheduling, `heedful status` and
lineage work unchanged, and the choice is recorded (`selection`) beside the adapter it picked.
The held-out prompts never reach this stage or any grid stage: only the chosen adapter is
evaluated on them, once.

The rule (`rank`), applied to the point estimates on the validation prompts:
  1. the best `metric` (default adherence; higher is better unless the metric is one where
     lower is, e.g. kl_to_base, see stages/evaluate.py LOWER_IS_BETTER; `scoped_adherence`,
     adherence less the mean firing rate near and out of scope, penalises overgeneralization
     instead of only breaking ties with it);
  2. ties: the lower overgeneralization (mean of overgen_near and overgen_out);
  3. still tied: the fewer unfinished replies;
  4. still tied: the first point in grid order (list the default or cheaper setting first).
A point whose metric was not measured ranks last. With a few validation prompts the winner may
be within noise of the others: arena.json's `grid` section keeps every point's intervals.
"""

from __future__ import annotations

import json
import math
import shutil
from typing import Any

from pydantic import Field

from pipeline.stage import Input, Output, Stage, StageConfig

#: at most this many grid points per method (each is a `validation_<k>` + `adapter_<k>` input pair)
MAX_POINTS = 12
RULE = (
    "best validation {metric}; ties: lower mean of overgen_near and overgen_out, then fewer unfinished replies, "
    "then the first point in grid order"
)


class ArenaSelectConfig(StageConfig):
    metric: str = Field(default="adherence", description="validation metric to choose by (an evaluate metric name)")
    settings: list[dict[str, Any]] = Field(
        default_factory=list, description="each point's grid settings, in input order (recorded in the selection)"
    )


#: selection metrics computed from the evaluate stage's own: higher is better
DERIVED = {
    # adherence in scope less the mean rate the feedback fires near and out of scope: a point that
    # adheres by applying the feedback everywhere (C3PO's overgeneralization) does not win on it
    "scoped_adherence": "adherence minus the mean of overgen_near and overgen_out",
}


def _value(metrics: dict[str, Any], name: str) -> float | None:
    if name == "scoped_adherence":
        adherence, near, out = (_value(metrics, m) for m in ("adherence", "overgen_near", "overgen_out"))
        fired = [v for v in (near, out) if v is not None]
        return None if adherence is None or not fired else adherence - sum(fired) / len(fired)
    value = metrics.get(name)
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def rank(metrics: dict[str, Any], metric: str) -> tuple[float, float, float]:
    """A sort key (smaller is better) for one point's validation metrics; see the module docstring."""
    from stages.evaluate import LOWER_IS_BETTER

    primary = _value(metrics, metric)
    if primary is None:
        primary_key = math.inf
    else:
        primary_key = primary if metric in LOWER_IS_BETTER else -primary
    overgen = [v for v in (_value(metrics, "overgen_near"), _value(metrics, "overgen_out")) if v is not None]
    unfinished = _value(metrics, "unfinished")
    return (primary_key, sum(overgen) / len(overgen) if overgen else 0.0, unfinished if unfinished is not None else 0.0)


def choose(points: list[dict[str, Any]], metric: str) -> int:
    """Index of the chosen point (the first of equals: Python's min is stable)."""
    if not points:
        raise ValueError("no grid point to choose from")
    if all(_value(p, metric) is None for p in points):
        raise ValueError(
            f"the validation metric '{metric}' was measured for no grid point: choose another (arena.select_by), "
            "e.g. adherence needs scoped validation prompts, ref_loglik reference answers"
        )
    return min(range(len(points)), key=lambda k: rank(points[k], metric))


class ArenaSelectStage(Stage):
    uses = "arena_select"
    summary = "Choose a method's grid point by its validation scores (never the held-out ones); pass its adapter on."
    Config = ArenaSelectConfig
    inputs = {
        **{
            f"validation_{k}": Input(("evaluation_summary",), required=k == 0, doc=f"grid point {k}: its validation summary")
            for k in range(MAX_POINTS)
        },
        **{f"adapter_{k}": Input(("adapter",), required=k == 0, doc=f"grid point {k}: its adapter") for k in range(MAX_POINTS)},
    }
    outputs = {
        "adapter": Output("adapter", doc="a copy of the chosen point's adapter"),
        "selection": Output("arena_selection", doc="JSON: metric, rule, every point's validation scores, the chosen one"),
    }
    config: ArenaSelectConfig

    def run(self):
        from pipeline.artifacts import atomic_write_json, read_json

        cfg: ArenaSelectConfig = self.config
        ctx = self.ctx
        given = [k for k in range(MAX_POINTS) if ctx.input(f"validation_{k}") is not None]
        if given != list(range(len(given))) or any(ctx.input(f"adapter_{k}") is None for k in given):
            raise ValueError("inputs: validation_<k> and adapter_<k> must come in pairs numbered 0, 1, 2, ...")
        if cfg.settings and len(cfg.settings) != len(given):
            raise ValueError(f"settings lists {len(cfg.settings)} points, the inputs {len(given)}")
        points = []
        for k in given:
            folder = ctx.input(f"validation_{k}")
            assert folder is not None
            summary = json.loads(folder.read_text())
            label = (summary.get("adapter") or {}).get("label")
            metrics = summary.get("conditions", {}).get(label, {}) if label else {}
            if not metrics:
                raise ValueError(f"{folder}: no adapter condition in this validation summary")
            adapter = ctx.input(f"adapter_{k}")
            assert adapter is not None
            points.append({"point": k, "stage": adapter.parent.name, "label": label, "metrics": metrics})
        chosen = choose([p["metrics"] for p in points], cfg.metric)
        source = ctx.input(f"adapter_{chosen}")
        assert source is not None
        shutil.copytree(source, ctx.output("adapter"))
        for k, point in enumerate(points):
            point["settings"] = cfg.settings[k] if cfg.settings else {}
        atomic_write_json(
            ctx.output("selection"),
            {"metric": cfg.metric, "rule": RULE.format(metric=cfg.metric), "chosen": chosen, "points": points},
        )
        ctx.log.info(
            "chose point %d (%s) of %d by validation %s = %s",
            chosen,
            points[chosen]["stage"],
            len(points),
            cfg.metric,
            _value(points[chosen]["metrics"], cfg.metric),
        )
        # the chosen stage's training metrics, so whoever reads this adapter's manifest sees its training cost
        trained = read_json(source.parent / "manifest.json") if (source.parent / "manifest.json").is_file() else {}
        return {
            "chosen": chosen,
            "points": len(points),
            f"validation_{cfg.metric}": _value(points[chosen]["metrics"], cfg.metric),
            **{k: v for k, v in (trained.get("metrics") or {}).items() if isinstance(v, (int, float))},
        }
