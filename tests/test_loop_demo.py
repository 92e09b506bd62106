"""The loop demo's driver (bench/loop_demo.py) end to end on the `tiny` model: a real server on
127.0.0.1 with a users file, simulated users through the `openai` client, one real loop round
in-process, the results JSON and the SVG figures. Sized to run in well under 90 s: the demo's
own loop file with tiny budgets (one CUT step: the tiny model never satisfies a user, so every
reaction is a dislike and KTO, which needs both labels, would have nothing to contrast)."""

from __future__ import annotations

import json

from bench.loop_demo import DemoSettings, run_demo
from bench.loop_demo_figures import plot

TINY_TRAIN = {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "save_steps": 1, "lora": {"r": 4, "alpha": 8}}
TINY_LOOP = {
    "loop": {
        "min_new_feedback": 3,
        "train": [{"method": "cut", "from": "verbal_feedback", "min_records": 3, "with": TINY_TRAIN}],
        "evaluate": {
            "with": {
                "sampling": {"max_new_tokens": 6, "temperature": 0.0},
                "max_general": 2,
                "resamples": 100,
                "users": {
                    "simulator": {"kind": "hf", "model": "tiny"},
                    "policy_sampling": {"max_new_tokens": 6, "temperature": 0.0},
                    "user_sampling": {"max_new_tokens": 6},
                },
            }
        },
    }
}


def test_one_round_with_three_users_writes_results_and_figures(tiny_model_path, tmp_path):
    settings = DemoSettings(
        model="tiny",
        rounds=1,
        users=3,
        max_rounds=1,
        max_tokens=6,
        user_tokens=6,
        simulator={"kind": "hf", "model": "tiny"},
        loop_overrides=TINY_LOOP,
    )
    result = json.loads(json.dumps(run_demo(settings, tmp_path / "work", say=lambda *_: None)))

    # two users phases (before the round, and the one that measures what it left deployed), one round
    phases, rounds = result["users_phases"], result["rounds"]
    assert [p["phase"] for p in phases] == [1, 2]
    for phase in phases:
        assert phase["users"] == 3 and phase["completions"] == 3 and phase["posted"]["reactions"] == 3
        assert phase["satisfied"]["n"] == 3 and phase["love_rate"]["n"] == 3
        sat = phase["satisfied"]
        assert 0 <= sat["lo"] <= sat["value"] + 1e-9 and sat["value"] <= sat["hi"] <= 1  # Wilson: lo can be 1e-17 at 0/n
        assert phase["version"] is not None and set(phase["versions"]) == {phase["version"]}
    assert [len(p["per_user"]) for p in phases] == [3, 3] and phases[0]["paired_vs_first"] is None
    pair = phases[1]["paired_vs_first"]
    assert pair["gained"] + pair["lost"] <= 3 and 0 < pair["sign_test_p"] <= 1
    assert len(rounds) == 1
    row = rounds[0]
    for field in ("round", "outcome", "counts", "version_before", "gate", "deployed", "version_after", "seconds"):
        assert field in row, field
    assert row["counts"]["reactions"] == 3 and row["counts"]["verbal_feedback"] == 3
    assert row["version_before"] == phases[0]["version"]
    assert isinstance(row["gate"]["passed"], bool) and row["deployed"] == row["gate"]["passed"]
    assert {r["metric"] for r in row["gate"]["rules"]} == {"satisfied", "kl_to_base", "unfinished"}
    # the version the users met next is the one the round left deployed (new if it passed, else the old one)
    assert phases[1]["version"] == row["version_after"]
    assert (phases[1]["version"] != phases[0]["version"]) == row["deployed"]
    assert {"pull", "train", "evaluate", "deploy", "total"} <= set(row["seconds"])
    assert [v["label"] for v in result["versions"]][0] == "v0 (base)"
    assert result["loop_status"][0]["deployed"] == row["deployed"]

    figures = plot(result, tmp_path / "figures")
    assert [f.name for f in figures] == ["loop_demo_rounds.svg", "loop_demo_versions.svg"]
    for figure in figures:
        text = figure.read_text()
        assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert ("REJECTED" in figures[0].read_text()) == (not row["deployed"])
