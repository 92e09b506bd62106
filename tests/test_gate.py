"""The loop's gate (stages/gate.py): every rule against hand-built evaluation summaries, failing
closed when a metric was not measured, and the loop file's checks (pipeline/loop.py)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from pipeline.errors import HeedfulError
from pipeline.loop import LoopFile, parse_duration, round_stages, trainable
from stages.gate import GateRule, decide


def summary(condition: str, **metrics) -> dict:
    return {
        "conditions": {
            condition: {
                k: ({"value": v, "n": 20, "lo": v - 0.1, "hi": v + 0.1} if k != "kl_to_base" else v) for k, v in metrics.items()
            }
        }
    }


def test_rules_pass_and_fail_as_computed_by_hand():
    cand = summary("candidate", satisfied=0.55, kl_to_base=0.2, unfinished=0.05)
    cur = summary("current", satisfied=0.60, kl_to_base=0.0, unfinished=0.10)
    rules = [
        GateRule(metric="satisfied", max_drop=0.1),  # 0.55 >= 0.60 - 0.1: pass
        GateRule(metric="kl_to_base", max=0.5),  # 0.2 <= 0.5: pass
        GateRule(metric="unfinished", max_rise=0.0),  # 0.05 <= 0.10: pass
    ]
    assert decide(rules, cand, cur, "candidate", "current")["passed"] is True
    strict = [GateRule(metric="satisfied", max_drop=0.04), GateRule(metric="kl_to_base", max=0.1)]
    decision = decide(strict, cand, cur, "candidate", "current")
    assert decision["passed"] is False
    assert decision["reasons"] == ["satisfied dropped 0.6 -> 0.55 (allowed 0.04)", "kl_to_base 0.2 > max 0.1"]
    assert decision["rules"][0]["candidate"]["n"] == 20 and decision["rules"][0]["current"]["value"] == 0.60
    assert decide([GateRule(metric="satisfied", min=0.56)], cand, cur, "candidate", "current")["passed"] is False


def test_the_gate_fails_closed_on_what_was_not_measured():
    cand = summary("candidate", kl_to_base=0.1)
    decision = decide([GateRule(metric="adherence", min=0.5)], cand, None, "candidate", "current")
    assert decision["passed"] is False and decision["reasons"] == ["adherence: not measured for the candidate"]
    decision = decide([GateRule(metric="kl_to_base", max_drop=0.1)], cand, None, "candidate", "current")
    assert decision["passed"] is False and "not measured for the deployed version" in decision["reasons"][0]
    assert decide([], cand, None, "candidate", "current")["passed"] is True  # no rules: nothing to fail


def test_a_rule_needs_a_bound():
    with pytest.raises(ValidationError, match="needs min, max, max_drop or max_rise"):
        GateRule(metric="satisfied")


def write_loop(tmp_path, **loop) -> LoopFile:
    path = tmp_path / "loop.yaml"
    body = {"server": "http://127.0.0.1:9", "train": [{"method": "kto", "from": "reactions", "min_records": 3}], **loop}
    extra = [{"name": "review", "uses": "argilla_push", "inputs": {"records": "pull.reactions"}}]
    path.write_text(yaml.safe_dump({"run_name": "l", "model": "tiny", "loop": body, "stages": extra}))
    return LoopFile(path)


def test_loop_file_errors_name_the_field_and_train_steps_follow_the_counts(tmp_path):
    with pytest.raises(HeedfulError, match="kto cannot train from preferences"):
        write_loop(tmp_path, train=[{"method": "kto", "from": "preferences"}])
    with pytest.raises(HeedfulError, match="field 'loop.min_new_feedback'"):
        write_loop(tmp_path, min_new_feedback=0)
    loop = write_loop(
        tmp_path,
        train=[
            {"method": "kto", "from": "reactions", "min_records": 3},
            {"method": "dpo", "from": "preferences", "min_records": 2},
        ],
    )
    assert not trainable(loop.spec, {"reactions": 2, "preferences": 1})
    assert trainable(loop.spec, {"reactions": 3})
    stages = round_stages(loop, "deploy", None, "/srv/adapter", {"reactions": 1, "preferences": 5})
    names = [s["name"] for s in stages]
    assert names == ["pull", "review", "train_2_dpo", "eval_current", "eval_candidate", "gate", "export", "deploy"]
    assert stages[2]["inputs"] == {"preferences": "pull.preferences", "adapter": "/srv/adapter"}  # continues the deployed one
    assert stages[3]["inputs"]["adapter"] == "/srv/adapter" and stages[4]["inputs"]["adapter"] == "train_2_dpo.adapter"
    assert [s["name"] for s in round_stages(loop, "train", "c.json", None, {"reactions": 3})] == ["pull", "review", "train_1_kto"]
    assert [s["name"] for s in round_stages(loop, "deploy", "c.json", None, {})] == ["pull", "review"]  # nothing to train
    assert parse_duration("10m") == 600 and parse_duration("1.5h") == 5400 and parse_duration("30") == 30
    with pytest.raises(HeedfulError, match="not a duration"):
        parse_duration("soon")
