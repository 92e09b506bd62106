"""The loop's gate (stages/gate.py): every rule against hand-built evaluation summaries, failing
closed when a metric was not measured, and the loop file's checks (pipeline/loop.py)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from pipeline.errors import HeedfulError
from pipeline.loop import LoopFile, evaluation_key, parse_duration, reusable_evaluation, round_stages, trainable
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


def with_items(summary_: dict, condition: str, metric: str, yes: int, n: int, offset: int = 0) -> dict:
    """`summary_` plus item outcomes for one metric: items offset .. offset + yes - 1 of 0 .. n - 1 are yes."""
    items = {f"need-{i}": offset <= i < offset + yes for i in range(n)}
    return {**summary_, "outcomes": {condition: {metric: items}}}


def test_paired_rules_compare_the_same_items():
    """40 held-out needs. The deployed version satisfies needs 0-19. A candidate satisfying 0-9 lost 10
    and gained none: worse with p = 2/1024; one satisfying 10-29 moved 10 each way: not worse, not
    better (p = 1), though a max_drop of 0 passes it (0.5 vs 0.5); one satisfying 0-29 gained 10."""
    rule = GateRule(metric="satisfied", worse_p=0.05)
    cur = with_items(summary("current", satisfied=0.5), "current", "satisfied", 20, 40)
    lost = with_items(summary("candidate", satisfied=0.25), "candidate", "satisfied", 10, 40)
    decision = decide([rule], lost, cur, "candidate", "current")
    assert decision["passed"] is False
    assert decision["reasons"] == [
        "satisfied worse than the deployed version: 0 items better, 10 worse of 40, p = 0.002 (< 0.05)"
    ]
    assert decision["rules"][0]["paired"]["turned_no"] == 10
    swapped = with_items(summary("candidate", satisfied=0.5), "candidate", "satisfied", 20, 40, offset=10)
    both = [rule, GateRule(metric="satisfied", max_drop=0.0)]
    assert decide(both, swapped, cur, "candidate", "current")["passed"] is True
    wants_better = GateRule(metric="satisfied", better_p=0.05)
    decision = decide([wants_better], swapped, cur, "candidate", "current")
    assert decision["passed"] is False and "not shown better" in decision["reasons"][0]
    gained = with_items(summary("candidate", satisfied=0.75), "candidate", "satisfied", 30, 40)
    assert decide([wants_better, rule], gained, cur, "candidate", "current")["passed"] is True
    # lower is better: 10 replies more unfinished is worse, 10 fewer is not
    unfinished = GateRule(metric="unfinished", worse_p=0.05)
    none_cut = {
        "candidate": with_items(summary("candidate"), "candidate", "unfinished", 0, 40),
        "current": with_items(summary("current"), "current", "unfinished", 0, 40),
    }
    ten_cut = {
        "candidate": with_items(summary("candidate"), "candidate", "unfinished", 10, 40),
        "current": with_items(summary("current"), "current", "unfinished", 10, 40),
    }
    assert decide([unfinished], ten_cut["candidate"], none_cut["current"], "candidate", "current")["passed"] is False
    assert decide([unfinished], none_cut["candidate"], ten_cut["current"], "candidate", "current")["passed"] is True
    # fails closed: a summary without item outcomes (before evaluate v2) cannot be paired
    decision = decide([rule], summary("candidate", satisfied=0.9), cur, "candidate", "current")
    assert decision["passed"] is False and "no item outcomes for the candidate" in decision["reasons"][0]
    decision = decide([rule], lost, summary("current", satisfied=0.5), "candidate", "current")
    assert decision["passed"] is False and "no item outcomes for the deployed version" in decision["reasons"][0]


def test_paired_rules_fail_when_the_items_cannot_decide():
    """No shared item, or too few for any split to reach the threshold (4 items all turning worse:
    p = 2/16 = 0.125 >= 0.1), fails rather than passing on a test that could not have failed; 5
    items can (2/32 < 0.1). better_p on a lower-is-better rate: fewer replies cut off is better."""
    rule = GateRule(metric="satisfied", worse_p=0.1)
    cur = with_items(summary("current"), "current", "satisfied", 4, 4)
    elsewhere = {**summary("candidate"), "outcomes": {"candidate": {"satisfied": {"other-1": True}}}}
    decision = decide([rule], elsewhere, cur, "candidate", "current")
    assert decision["passed"] is False and "share no item" in decision["reasons"][0]
    same = with_items(summary("candidate"), "candidate", "satisfied", 4, 4)
    decision = decide([rule], same, cur, "candidate", "current")
    assert decision["passed"] is False and "4 shared items cannot show a difference at p < 0.1" in decision["reasons"][0]
    five = (
        with_items(summary("candidate"), "candidate", "satisfied", 5, 5),
        with_items(summary("current"), "current", "satisfied", 5, 5),
    )
    assert decide([rule], *five, "candidate", "current")["passed"] is True
    fewer_cut = GateRule(metric="unfinished", better_p=0.05)
    cand = with_items(summary("candidate"), "candidate", "unfinished", 0, 40)
    cur_cut = {k: with_items(summary("current"), "current", "unfinished", k, 40) for k in (1, 10)}
    assert decide([fewer_cut], cand, cur_cut[10], "candidate", "current")["passed"] is True
    assert decide([fewer_cut], cand, cur_cut[1], "candidate", "current")["passed"] is False


def test_a_rule_needs_a_bound():
    with pytest.raises(ValidationError, match="needs min, max, max_drop, max_rise, worse_p or better_p"):
        GateRule(metric="satisfied")
    with pytest.raises(ValidationError, match="'kl_to_base' is not one"):
        GateRule(metric="kl_to_base", worse_p=0.1)


def write_loop(tmp_path, **loop) -> LoopFile:
    path = tmp_path / "loop.yaml"
    body = {"server": "http://127.0.0.1:9", "train": [{"method": "kto", "from": "reactions", "min_records": 3}], **loop}
    extra = [{"name": "review", "uses": "argilla_push", "inputs": {"records": "pull.reactions"}}]
    path.write_text(yaml.safe_dump({"run_name": "l", "model": "tiny", "loop": body, "stages": extra}))
    return LoopFile(path)


def test_the_evaluation_key_changes_when_a_local_base_model_is_retrained_in_place(tmp_path, tiny_model_path):
    """A loop on a local model folder: weights retrained into the same folder are not the deployed
    version's measured base, so an earlier evaluation is not reused (the key hashes the folder's
    content, as the round's stages fingerprint it)."""
    import shutil

    shutil.copytree(tiny_model_path, tmp_path / "mine")
    path = tmp_path / "loop.yaml"
    body = {"server": "http://127.0.0.1:9", "train": [{"method": "kto", "from": "reactions", "min_records": 3}]}
    path.write_text(yaml.safe_dump({"run_name": "l", "model": "./mine", "loop": body}))
    key = evaluation_key(LoopFile(path))
    assert evaluation_key(LoopFile(path)) == key
    weights = next((tmp_path / "mine").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    assert evaluation_key(LoopFile(path)) != key


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


def test_a_c3po_step_from_critiques_is_three_stages_and_its_settings_are_checked(tmp_path):
    critique = {"grouping": {"threshold": 0.6}, "near_scope_prompts": 3}
    step = {"method": "c3po", "from": "critiques", "min_records": 3, "critique": critique, "data": {"reviser": "template"}}
    loop = write_loop(tmp_path, train=[{"method": "kto", "from": "reactions", "min_records": 3}, step])
    assert not trainable(loop.spec, {"critiques": 2}) and trainable(loop.spec, {"critiques": 3})
    stages = round_stages(loop, "train", None, "/srv/adapter", {"critiques": 3, "reactions": 0, "followups": 2})
    assert [s["name"] for s in stages] == ["pull", "review", "critique_2", "c3po_data_2", "train_2_c3po"]
    assert stages[2]["inputs"] == {"feedback": "pull.verbal_feedback", "followups": "pull.followups"}
    assert stages[2]["with"] == {**critique, "min_users": 3}  # the step's min_records: distinct users
    assert stages[3]["inputs"] == {"feedback": "critique_2.feedback", "prompts": "critique_2.prompts", "adapter": "/srv/adapter"}
    assert stages[3]["with"] == {"reviser": "template"}
    assert stages[4]["inputs"] == {"data": "c3po_data_2.train", "adapter": "/srv/adapter"}
    with pytest.raises(HeedfulError, match="c3po cannot train from reactions"):
        write_loop(tmp_path, train=[{"method": "c3po", "from": "reactions"}])
    with pytest.raises(HeedfulError, match="belong to a c3po step from critiques"):
        write_loop(tmp_path, train=[{"method": "kto", "from": "reactions", "data": {"reviser": "template"}}])
    with pytest.raises(HeedfulError, match="critique.grouping"):
        write_loop(tmp_path, train=[{**step, "critique": {"grouping": {"similarity": "words"}}}])


def test_an_earlier_evaluation_of_the_deployed_version_is_reused_only_with_the_same_settings(tmp_path):
    loop = write_loop(tmp_path)
    key = evaluation_key(loop)
    assert evaluation_key(write_loop(tmp_path, evaluate={"with": {"max_general": 2}})) != key
    from stages.evaluate import EvaluateStage

    version = EvaluateStage.version
    try:  # a heedful upgrade whose evaluate stage measures differently (its version) measures again
        EvaluateStage.version = version + "+next"
        assert evaluation_key(loop) != key
    finally:
        EvaluateStage.version = version
    assert evaluation_key(loop) == key
    root = tmp_path / "runs"
    for run, stage in (("round-001", "eval_candidate"), ("round-002", "eval_current")):
        (root / run / stage).mkdir(parents=True)
        (root / run / stage / "summary").write_text("{}")
    deployed = {
        "round": 1,
        "run": "round-001",
        "phase": "done",
        "evaluation_key": key,
        "deployed": True,
        "version_after": "adp-1",
    }
    rejected = {"round": 2, "run": "round-002", "phase": "done", "evaluation_key": key, "deployed": False}
    rejected.update(current_version="adp-1", current_adapter="/srv/a", gate={"passed": False})
    found = reusable_evaluation(root, [deployed], "adp-1", key)
    assert found == {"summary": str(root / "round-001" / "eval_candidate" / "summary"), "condition": "candidate"}
    again = reusable_evaluation(root, [deployed, rejected], "adp-1", key)  # the latest evaluation of adp-1
    assert again == {"summary": str(root / "round-002" / "eval_current" / "summary"), "condition": "current"}
    assert reusable_evaluation(root, [deployed], "adp-1", "other-settings") is None
    assert reusable_evaluation(root, [deployed], "adp-2", key) is None  # another version is deployed now
    assert reusable_evaluation(root, [{**deployed, "run": "round-009"}], "adp-1", key) is None  # its summary is gone
    stages = round_stages(loop, "evaluate", None, "/srv/a", {"reactions": 3}, found)
    names = [s["name"] for s in stages]
    assert "eval_current" not in names and names[-2:] == ["eval_candidate", "gate"]
    assert stages[-1]["inputs"]["current"] == found["summary"] and stages[-1]["with"]["current_condition"] == "candidate"


def test_the_commented_c3po_step_of_configs_loop_yaml_validates(tmp_path):
    """`heedful validate` on configs/loop.yaml with its commented C3PO step switched on: every
    stage of a full round (critique_3, c3po_data_3, train_3_c3po included) and its settings check."""
    import re
    from pathlib import Path

    from pipeline.loop import full_round

    text = (Path(__file__).resolve().parent.parent / "configs" / "loop.yaml").read_text()
    text = re.sub(r"^    # - method: c3po", "    - method: c3po", text, flags=re.M)
    text = re.sub(r"^    #   ", "      ", text, flags=re.M)
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    pipeline = full_round(LoopFile(path))
    names = [s.name for s in pipeline.stages]
    assert names[3:6] == ["critique_3", "c3po_data_3", "train_3_c3po"] and names[-1] == "deploy"
    assert pipeline.stage("critique_3").spec.with_["generator"]["kind"] == "openai"


def test_a_loop_reads_its_token_file_beside_the_loop_file(tmp_path, monkeypatch):
    """`token_file: token` in loops/loop.yaml run from another folder is loops/token, for the loop's
    own calls and for its pull and deploy stages alike (a decoy of the same name in the working
    directory is not read), as every path a pipeline config names is read beside it."""
    from pipeline.loop import Loop, full_round

    loops = tmp_path / "loops"
    loops.mkdir()
    here = tmp_path / "elsewhere"
    here.mkdir()
    for folder, token in ((loops, "beside-the-loop-file-0123456789"), (here, "a-decoy-in-the-working-dir-0123")):
        (folder / "token").write_text(token)
        (folder / "token").chmod(0o600)
    body = {"server": "http://127.0.0.1:9", "token_file": "token", "train": [{"method": "kto", "from": "reactions"}]}
    (loops / "loop.yaml").write_text(yaml.safe_dump({"run_name": "l", "model": "tiny", "loop": body}))
    monkeypatch.chdir(here)
    loop = LoopFile(loops / "loop.yaml")
    assert loop.spec.token_file == str(loops / "token")
    assert Loop(loop, tmp_path / "runs", use_ray=False).token() == "beside-the-loop-file-0123456789"
    pipeline = full_round(loop)
    assert pipeline.stage("pull").config.token_file == pipeline.stage("deploy").config.token_file == str(loops / "token")
