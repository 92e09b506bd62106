"""Reward models refreshed across the loop's rounds (issue 14), on the `tiny` model against a real
`heedful serve`: a `rewards:` entry trains P[Love] on every reaction pulled so far, continuing the
previous round's model, and that model scores both evaluations so the gate can read it.

Round 1: alice reacts to six replies; the round trains P[Love] from scratch on those six. Round 2:
six more; the refresh reads all twelve (each once) and round 1's model as its init, and its
weights move. Round 3: two reactions (and two edits, so DPO trains): too few for the refresh, so
round 2's model is kept, and since it also scored round 2's evaluation of the now-deployed version,
that evaluation is reused. Stages run in-process (use_ray=False), as in tests/test_loop.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import HeedfulError
from pipeline.loop import Loop, LoopFile, full_round, load_state, round_pipeline, round_stages, status_rows
from pipeline.loop_report import write_loop_report
from pipeline.records import load_rows
from pipeline.runner import Runner, fingerprints

from .test_loop import QUESTIONS, converse, loop_file, server

RM = {
    "kind": "plove",
    "from": "reactions",
    "min_records": 4,
    "with": {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "learning_rate": 1e-3,
        "eval_fraction": 0.5,
        "lora": {"r": 4, "alpha": 8},
        "plove": {"tfidf_baseline": False},
    },
}
RULES = [{"metric": "kl_to_base", "max": 1000.0}, {"metric": "unfinished", "max": 1.0}, {"metric": "reward/plove", "min": 0.0}]


@pytest.fixture
def live(tiny_model_path, tmp_path):
    with server(tmp_path / "server") as srv:
        yield srv


def reaction_ids(run_dir: Path) -> list[str]:
    return [row["id"] for row in load_rows(run_dir / "pull" / "reactions")]


def adapter(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter" / "adapter_model.safetensors"))


def test_reward_model_refreshed_on_all_feedback_so_far_continuing_the_last(live, tmp_path):
    runs = tmp_path / "runs"
    path = loop_file(tmp_path, live, "loop_r", RULES, rewards=[RM])

    def one_round() -> dict:
        done = Loop(LoopFile(path), runs, use_ray=False).run(rounds=1, min_new=4, every=None, log=lambda *_: None)
        assert len(done) == 1 and done[0]["phase"] == "done", done
        return done[0]

    converse(live, "alice", QUESTIONS)
    first = one_round()
    root = runs / "loop_r"
    (r1,) = first["rewards"]
    assert r1["trained"] is True and r1["init"] is None  # from scratch
    assert r1["stage"] == "reward_1_plove" and r1["path"] == str(root / "round-001" / "reward_1_plove" / "reward_model")
    round1_ids = reaction_ids(root / "round-001")
    assert len(round1_ids) == len(QUESTIONS) == r1["records"] == r1["new"]
    assert [row["id"] for row in load_rows(Path(r1["data"]))] == round1_ids
    assert "init" not in json.loads(Path(r1["path"], "reward_model.json").read_text())
    assert set(r1["metrics"]) >= {"auroc", "eval_examples"}  # its held-out metrics, in loop.json

    converse(live, "alice", [q + " Again." for q in QUESTIONS])
    second = one_round()
    (r2,) = second["rewards"]
    assert r2["trained"] is True and r2["init"] == r1["path"] and r2["new"] == len(QUESTIONS)
    pooled = [row["id"] for row in load_rows(Path(r2["data"]))]
    both = round1_ids + reaction_ids(root / "round-002")
    assert len(pooled) == len(set(pooled)) == len(both) == 12 == r2["records"] and set(pooled) == set(both)
    assert json.loads(Path(r2["path"], "reward_model.json").read_text())["init"] == r1["path"]  # continued round 1's
    pipeline = json.loads((root / "round-002" / "pipeline.json").read_text())
    assert r1["path"] in json.dumps(pipeline) and r2["data"] in json.dumps(pipeline)  # the stage's init and pool
    before, after = adapter(r1["path"]), adapter(r2["path"])
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)  # refreshed
    # the refreshed model scores both evaluations, and the gate read its score
    assert second["reuse_current"] is None  # round 1's evaluation of this version was scored by round 1's model
    for stage in ("eval_current", "eval_candidate"):
        summary = json.loads((root / "round-002" / stage / "summary").read_text())
        assert all(c.get("reward/plove", {}).get("value") is not None for c in summary["conditions"].values())
    rule = next(r for r in second["gate"]["rules"] if r["metric"] == "reward/plove")
    assert rule["candidate"]["value"] is not None and rule["current"]["value"] is not None

    # resume: the finished stage is skipped; a changed pool changes its fingerprint (and only its consumers')
    stages = round_stages(
        LoopFile(path), "train", second["cursor_in"], second["current_adapter"], second["trainable"], rewards=second["rewards"]
    )
    pipe = round_pipeline(LoopFile(path), "round-002", stages)
    again = Runner(pipe, root, use_ray=False).execute()
    assert again.ok and again.record("reward_1_plove").status == "skipped"
    old, text = fingerprints(pipe), Path(r2["data"]).read_text()
    Path(r2["data"]).write_text(text + text.splitlines()[0] + "\n")
    new = fingerprints(round_pipeline(LoopFile(path), "round-002", stages))
    assert new["reward_1_plove"] != old["reward_1_plove"] and new["train_1_kto"] == old["train_1_kto"]
    Path(r2["data"]).write_text(text)

    # too few reactions: the refresh is skipped and round 2's model kept (and it scores the evaluations)
    converse(live, "alice", ["Name a bird.", "Name a month."], edits=2)
    third = one_round()
    (r3,) = third["rewards"]
    assert r3["trained"] is False and r3["path"] == r2["path"] and "2 new reactions record(s) < min_records 4" in r3["why"]
    order = json.loads((root / "round-003" / "pipeline.json").read_text())["order"]
    assert "reward_1_plove" not in order and third["trained"] == ["dpo"]
    # the deployed version is round 2's candidate, scored then by the same model: its evaluation is reused
    assert third["reuse_current"]["summary"] == str(root / "round-002" / "eval_candidate" / "summary")
    assert "eval_current" not in order

    rounds = load_state(root)["rounds"]
    assert [e["rewards"][0]["path"] for e in rounds] == [r1["path"], r2["path"], r2["path"]]
    rows = status_rows(root)
    assert rows[0]["rewards"].startswith("plove: trained on 6 (auroc ")  # from scratch
    assert rows[1]["rewards"].startswith("plove: refreshed on 12 from round-001 (auroc ")
    assert rows[2]["rewards"] == "plove: kept round-002 (2 new reactions record(s) < min_records 4)"
    page = write_loop_report(root).read_text()
    assert "plove: refreshed on 12 from round-001" in page and "kept round-002" in page


def test_loop_rewards_errors_name_the_entry(tmp_path):
    def loop_with(rewards: list[dict], **evaluate) -> Path:
        import yaml

        body = {"server": "http://127.0.0.1:1", "train": [{"method": "kto", "from": "reactions"}], "rewards": rewards}
        body["evaluate"] = evaluate
        path = tmp_path / "l.yaml"
        path.write_text(yaml.safe_dump({"run_name": "l", "model": "tiny", "loop": body}))
        return path

    # `heedful validate` checks an entry's train_reward settings in a full round, where it trains from the pull
    full = full_round(LoopFile(loop_with([{"kind": "plove", "from": "reactions", "with": {"max_steps": 3}}])))
    stage = full.stage("reward_1_plove")
    assert stage.spec.inputs == {"feedback": "pull.reactions"} and stage.config.max_steps == 3
    with pytest.raises(HeedfulError, match=r"with\.plove\.bins: Input should be greater than or equal to 2"):
        full_round(LoopFile(loop_with([{"kind": "plove", "from": "reactions", "with": {"plove": {"bins": 1}}}])))
    with pytest.raises(HeedfulError, match=r"loop.rewards.0: plove cannot train from preferences"):
        LoopFile(loop_with([{"kind": "plove", "from": "preferences"}]))
    with pytest.raises(HeedfulError, match="span annotations, which heedful serve does not collect"):
        LoopFile(loop_with([{"kind": "fine_grained", "from": "verbal_feedback"}]))
    with pytest.raises(HeedfulError, match="learns only when fine-tuned"):
        LoopFile(loop_with([{"kind": "followup", "from": "preferences"}]))
    with pytest.raises(HeedfulError, match="would both report reward/<kind>"):
        LoopFile(loop_with([{"kind": "plove", "from": "reactions"}, {"kind": "plove", "from": "reactions"}]))
    with pytest.raises(HeedfulError, match="1 free reward_model input"):
        LoopFile(
            loop_with(
                [
                    {"kind": "plove", "from": "reactions"},
                    {"kind": "followup", "from": "preferences", "with": {"followup": {"finetune": True}}},
                ],
                inputs={"reward_model": "a", "reward_model_2": "b"},
            )
        )
