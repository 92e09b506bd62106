"""gate: may the candidate adapter replace the deployed one? Thresholds on two evaluations.

Why a stage of its own: the decision is an artifact (`decision.json`: every rule, the two
values it compared, pass or fail, and why), so a round's report, `heedful loop status` and a
later audit read the same answer the deploy stage acted on. The gate fails closed: a rule
whose metric the evaluation did not measure fails with that reason rather than passing.

Rules compare the candidate's evaluation (its `adapter` condition) with fixed bounds (`min`,
`max`) or with the deployed version's evaluation (`max_drop`: the candidate may be at most
this much worse). Those values are point estimates; each rule's line shows both intervals, so a
reader sees when a pass or a fail is within noise. Both versions answer the same held-out items,
so a yes/no metric can also be compared item by item (`worse_p`: fail when the candidate is worse
beyond noise, exact McNemar p; `better_p`: pass only when it is better beyond noise), which sees a
change that two overlapping intervals cannot. `worse_p` alone is not a non-inferiority test (a
small loss on few items passes it); pair it with `max_drop` to bound how much worse may pass.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.stage import Input, Output, Stage, StageConfig
from pipeline.stats import clean, mcnemar_p, paired_difference


class GateRule(BaseModel):
    """One threshold: `metric` of the candidate within [min, max], or no worse than the current by `max_drop`."""

    model_config = ConfigDict(extra="forbid")
    metric: str = Field(description="an evaluate metric, e.g. satisfied, adherence, overgen_out, kl_to_base")
    min: float | None = None
    max: float | None = None
    max_drop: float | None = Field(default=None, ge=0, description="candidate >= current - max_drop")
    max_rise: float | None = Field(default=None, ge=0, description="candidate <= current + max_rise (lower is better)")
    worse_p: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="paired with the deployed version on the same items (a yes/no metric): fail when the candidate "
        "is worse with exact McNemar p below this",
    )
    better_p: float | None = Field(
        default=None, gt=0, lt=1, description="paired likewise: pass only when the candidate is better with p below this"
    )

    @model_validator(mode="after")
    def _one_bound(self) -> GateRule:
        if all(v is None for v in (self.min, self.max, self.max_drop, self.max_rise, self.worse_p, self.better_p)):
            raise ValueError(f"gate rule for '{self.metric}' needs min, max, max_drop, max_rise, worse_p or better_p")
        from pipeline.arena_table import RATES

        if (self.worse_p is not None or self.better_p is not None) and self.metric not in RATES:
            raise ValueError(
                f"worse_p / better_p pair yes/no metrics item by item ({', '.join(sorted(RATES))}); "
                f"'{self.metric}' is not one: bound it with min, max, max_drop or max_rise"
            )
        return self


class GateConfig(StageConfig):
    rules: list[GateRule] = Field(default_factory=list, description="every rule must pass; no rules: the gate passes")
    candidate_condition: str = Field(default="candidate", description="condition name of the candidate in its summary")
    current_condition: str = Field(default="current", description="condition name of the deployed version in its summary")


def value_of(summary: dict[str, Any] | None, condition: str, metric: str) -> dict[str, Any] | None:
    """`{value, n, lo, hi}` of a metric for a condition; None when absent or measured over nothing."""
    from pipeline.evaluation.summary import metric_value

    if not summary:
        return None
    found = metric_value(summary, condition, metric)
    return found if found is not None and found.get("value") is not None else None


def judge(rule: GateRule, candidate: dict[str, Any] | None, current: dict[str, Any] | None) -> tuple[bool, str]:
    """(passed, why) for one rule; a missing measurement fails."""
    if candidate is None:
        return False, f"{rule.metric}: not measured for the candidate"
    value = float(candidate["value"])
    if rule.min is not None and value < rule.min:
        return False, f"{rule.metric} {value:.3g} < min {rule.min:g}"
    if rule.max is not None and value > rule.max:
        return False, f"{rule.metric} {value:.3g} > max {rule.max:g}"
    for bound, sign in ((rule.max_drop, -1), (rule.max_rise, 1)):
        if bound is None:
            continue
        if current is None:
            return False, f"{rule.metric}: not measured for the deployed version, cannot compare"
        limit = float(current["value"]) + sign * bound
        if (sign < 0 and value < limit) or (sign > 0 and value > limit):
            word = "dropped" if sign < 0 else "rose"
            return False, f"{rule.metric} {word} {float(current['value']):.3g} -> {value:.3g} (allowed {bound:g})"
    return True, f"{rule.metric} {value:.3g} ok"


def items_of(summary: dict[str, Any] | None, condition: str, metric: str) -> dict[str, bool] | None:
    """A yes/no metric's outcome per held-out item (evaluate v2 `outcomes`), or None when not recorded."""
    found = (((summary or {}).get("outcomes") or {}).get(condition) or {}).get(metric)
    return found or None


def judge_paired(
    rule: GateRule, candidate: dict[str, bool] | None, current: dict[str, bool] | None
) -> tuple[bool, str, dict | None]:
    """(passed, why, the paired comparison) for `worse_p` / `better_p`; outcomes not recorded fail."""
    from pipeline.arena_table import directed

    if candidate is None or current is None:
        which = "the candidate" if candidate is None else "the deployed version"
        return False, f"{rule.metric}: no item outcomes for {which} (a yes/no metric of evaluate v2), cannot pair", None
    paired = directed(rule.metric, paired_difference(candidate, current))
    shown = f"{paired['better']} items better, {paired['worse']} worse of {paired['n']}, p = {paired['p']:.2g}"
    if paired["n"] == 0:
        return False, f"{rule.metric}: the two evaluations share no item, cannot pair", paired
    if rule.worse_p is not None and mcnemar_p(0, paired["n"]) >= rule.worse_p:
        # Even every shared item turning worse could not reach the threshold: passing would
        # claim "not worse" from a test that could not have said otherwise.
        return (
            False,
            f"{rule.metric}: {paired['n']} shared items cannot show a difference at p < {rule.worse_p:g} "
            "(evaluate more held-out items, or use max_drop)",
            paired,
        )
    if rule.worse_p is not None and paired["worse"] > paired["better"] and paired["p"] < rule.worse_p:
        return False, f"{rule.metric} worse than the deployed version: {shown} (< {rule.worse_p:g})", paired
    if rule.better_p is not None and not (paired["better"] > paired["worse"] and paired["p"] < rule.better_p):
        return False, f"{rule.metric} not shown better than the deployed version: {shown} (needs < {rule.better_p:g})", paired
    return True, f"{rule.metric} paired ok: {shown}", paired


def decide(rules: list[GateRule], candidate: dict | None, current: dict | None, cand_name: str, cur_name: str) -> dict:
    """The decision document: passed iff every rule passed."""
    lines = []
    for rule in rules:
        cand, cur = value_of(candidate, cand_name, rule.metric), value_of(current, cur_name, rule.metric)
        line: dict[str, Any] = {"metric": rule.metric, "candidate": cand, "current": cur, **rule.model_dump()}
        reasons = []
        bounded = any(v is not None for v in (rule.min, rule.max, rule.max_drop, rule.max_rise))
        if bounded:
            ok, why = judge(rule, cand, cur)
            reasons.append((ok, why))
        if rule.worse_p is not None or rule.better_p is not None:
            cand_items, cur_items = items_of(candidate, cand_name, rule.metric), items_of(current, cur_name, rule.metric)
            ok, why, line["paired"] = judge_paired(rule, cand_items, cur_items)
            reasons.append((ok, why))
        failed = [why for ok, why in reasons if not ok]
        line.update(passed=not failed, why="; ".join(failed or [why for _, why in reasons]))
        lines.append(line)
    failed = [line["why"] for line in lines if not line["passed"]]
    return {"passed": not failed, "reasons": failed, "rules": lines}


class GateStage(Stage):
    uses = "gate"
    summary = "Pass or fail a candidate adapter against thresholds and the deployed version's evaluation."
    Config = GateConfig
    inputs = {
        "candidate": Input(("evaluation_summary",), doc="the candidate's evaluate summary"),
        "current": Input(("evaluation_summary",), required=False, doc="the deployed version's evaluate summary"),
    }
    outputs = {"decision": Output("gate_decision", doc="JSON: passed, reasons, every rule with both values")}

    def run(self):
        cfg: GateConfig = self.config
        candidate = json.loads(self.ctx.input("candidate").read_text(encoding="utf-8"))
        current_path = self.ctx.input("current")
        current = json.loads(current_path.read_text(encoding="utf-8")) if current_path else None
        decision = decide(cfg.rules, candidate, current, cfg.candidate_condition, cfg.current_condition)
        self.ctx.output("decision").write_text(json.dumps(clean(decision), indent=2), encoding="utf-8")
        verdict = "passed" if decision["passed"] else "FAILED: " + "; ".join(decision["reasons"])
        self.ctx.log.info("gate %s", verdict)
        return {"passed": decision["passed"], "failed_rules": len(decision["reasons"])}
