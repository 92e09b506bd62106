"""Experiment tracking for evaluations and the arena (pipeline/tracking.py): what `evaluate`
and `heedful arena` write to TensorBoard is read back from the event files and compared with
summary.json / the arena table; a tracker that is not installed fails before any work."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from pipeline.models import ModelUnavailable

from .test_arena import tiny_arena
from .test_evaluate_metrics import fixed_reference, run_evaluate, write_general, write_scoped_prompts


def read_events(log_dir: Path) -> dict[str, dict]:
    """Every value in the TFRecord event files under `log_dir`: scalars, texts and PNG images by tag.

    A record is: length (uint64), its CRC (uint32), the Event proto, its CRC (uint32)."""
    from tensorboardX.proto import event_pb2

    found: dict[str, dict] = {"scalars": {}, "texts": {}, "images": {}}
    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    assert files, f"no event files under {log_dir}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    found["images"][value.tag] = value.image.encoded_image_string
                elif value.metadata.plugin_data.plugin_name == "text":
                    # tensorboardX adds "/text_summary" to a text's tag (torch's writer does not)
                    found["texts"][value.tag.removesuffix("/text_summary")] = value.tensor.string_val[0].decode()
                elif value.HasField("simple_value"):
                    found["scalars"][value.tag] = value.simple_value
    return found


def without(package: str, monkeypatch) -> None:
    """As if `package` were not installed (it is not here; the patch keeps the test true where it is)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


def test_evaluate_logs_its_summary_to_tensorboard_beside_the_training_curves(tmp_path, tiny_model_path):
    inputs = {
        "prompts": str(write_scoped_prompts(tmp_path)),
        "general": str(write_general(tmp_path)),
        "reference": str(fixed_reference(tmp_path / "reference")),
    }
    settings = {"conditions": ["base", "in_context"], "resamples": 200}
    result = run_evaluate(tmp_path, inputs, {**settings, "report_to": "tensorboard"})
    assert result.ok, result.records[0].error
    stage_dir = result.run_dir / "check"
    summary = json.loads((stage_dir / "summary").read_text())
    events = read_events(stage_dir / "tensorboard")  # runs/<run>/<stage>/tensorboard, as training stages
    scalars = events["scalars"]

    # every estimate of summary.json, as value, lo, hi and n per condition (float32 in the event file)
    logged = 0
    for condition, metrics in summary["conditions"].items():
        for metric, estimate in metrics.items():
            if isinstance(estimate, dict) and "value" in estimate:
                tag = f"{metric}/{condition}"
                for suffix, key in (("", "value"), ("/lo", "lo"), ("/hi", "hi"), ("/n", "n")):
                    assert scalars[tag + suffix] == pytest.approx(estimate[key], rel=1e-6, abs=1e-6), tag + suffix
                    logged += 1
    assert logged >= 2 * 4 * 6  # two conditions, at least adherence, both firings, unfinished, kl, ref_loglik
    # hand-checked (tests/test_evaluate_metrics.py's fixed replies): base adheres on 1 of 3, in_context on 3 of 3
    assert scalars["adherence/base"] == pytest.approx(1 / 3) and scalars["adherence/base/n"] == 3
    assert scalars["adherence/in_context"] == 1.0 and scalars["kl_to_base/base"] == 0.0
    assert scalars["length_vs_base/in_context"] == pytest.approx(summary["conditions"]["in_context"]["length_vs_base"]["value"])

    # the report's bars of every rate with its interval, as an image
    assert set(events["images"]) == {"evaluation/rates"} and events["images"]["evaluation/rates"].startswith(b"\x89PNG")

    table = events["texts"]["evaluation/summary"]
    assert table.splitlines()[0] == "| condition | metric | value | lo | hi | n |"
    assert "| base | adherence | 0.3333 |" in table and "| in_context | adherence | 1 |" in table

    # report_to is how to run, not what is measured: switching it off reruns nothing
    again = run_evaluate(tmp_path, inputs, {**settings, "report_to": "none"})
    assert [r.status for r in again.records] == ["skipped"]


def hand_table() -> dict:
    """An arena table as pipeline/arena_table.collect builds it: two conditions and two methods."""

    def rate(value, lo, hi, n=20):
        return {"value": value, "lo": lo, "hi": hi, "n": n}

    def row(condition, method, adherence, out, near, seconds=None):
        metrics = {"adherence": adherence, "overgen_out": out, "overgen_near": near}
        return {
            "condition": condition,
            "method": method,
            "seed": 0 if method else None,
            "status": "done",
            "error": None,
            "chosen": None,
            "metrics": metrics,
            "cost": {"train_seconds": seconds, "eval_seconds": 5.0},
        }

    rows = [
        row("base", None, rate(0.1, 0.03, 0.3), rate(0.0, 0.0, 0.16), rate(0.05, 0.01, 0.24)),
        row("in_context", None, rate(0.6, 0.39, 0.78), rate(0.25, 0.11, 0.47), rate(0.4, 0.22, 0.61)),
        row("dpo_s0", "dpo", rate(0.8, 0.58, 0.92), rate(0.15, 0.05, 0.36), rate(0.3, 0.15, 0.52), 40.0),
    ]
    rows.append({**rows[-1], "condition": "c3po_s0", "method": "c3po", "status": "failed", "error": "boom", "metrics": {}})
    return {"source": "verbal", "budget": {"max_steps": 2}, "rows": rows}


def test_arena_table_and_pareto_plots_go_to_tensorboard(tmp_path):
    from pipeline.tracking import log_arena

    log_arena(["tensorboard"], tmp_path / "arena" / "tensorboard", "demo/arena", hand_table())
    events = read_events(tmp_path / "arena" / "tensorboard")
    lines = events["texts"]["arena/table"].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:9] == [
        "condition",
        "method",
        "seed",
        "status",
        "chosen",
        "adherence",
        "adherence_lo",
        "adherence_hi",
        "adherence_n",
    ]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["base", "in_context", "dpo_s0", "c3po_s0"]
    assert "| dpo_s0 | dpo | 0 | done |  | 0.8 | 0.58 | 0.92 | 20 |" in lines[4]
    assert "| failed |" in lines[5] and lines[5].endswith("| boom |")
    # the two plots with two points or more (no kl_to_base here: the drift plots are not drawn)
    assert set(events["images"]) == {"arena/adherence_vs_overgen_out", "arena/adherence_vs_overgen_near"}
    assert all(png.startswith(b"\x89PNG") and len(png) > 1000 for png in events["images"].values())
    assert "arena/head_to_head" not in events["texts"]  # one finished trained row: no pair

    # two trained rows of one seed: their pair goes to the tracker as head_to_head.csv's rows
    table = hand_table()
    pair = {"value": -0.2, "lo": -0.4, "hi": 0.0, "n": 20, "better": 1, "worse": 5, "p": 0.22, "p_holm": 0.22}
    table["head_to_head"] = [{"a": "dpo_s0", "b": "kto_s0", "seed": 0, "paired": {"adherence": pair}}]
    log_arena(["tensorboard"], tmp_path / "pairs" / "tensorboard", "demo/arena", table)
    lines = read_events(tmp_path / "pairs" / "tensorboard")["texts"]["arena/head_to_head"].splitlines()
    assert lines[0] == "| a | b | seed | metric | value | lo | hi | n | better | worse | p | p_holm |"
    assert lines[2] == "| dpo_s0 | kto_s0 | 0 | adherence | -0.2 | -0.4 | 0 | 20 | 1 | 5 | 0.22 | 0.22 |"


def test_two_writers_in_one_folder_within_a_second_keep_both_files(tmp_path):
    """tensorboardX names an events file by the second it opened; without a suffix of its own, a second
    writer opened in the same second replaced the first one's file and its points were lost."""
    from pipeline.tracking import log_curves

    log_curves(["tensorboard"], tmp_path, "demo/x", [(0, {"first": 1.0})])
    log_curves(["tensorboard"], tmp_path, "demo/x", [(0, {"second": 2.0})])
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert read_events(tmp_path)["scalars"] == {"first": 1.0, "second": 2.0}


def test_an_unchanged_arena_table_is_not_logged_twice(tmp_path):
    """`heedful arena` logs its table at the end of every invocation; a rerun in which every stage was
    up to date rebuilds the same table and must not add a second copy to the tracker. A changed table is
    logged again."""
    from pipeline.arena import log_new_table

    folder = tmp_path / "arena" / "tensorboard"

    def event_files():  # name -> bytes (tensorboardX names a file by the second it opened: compare contents too)
        return {p.name: p.read_bytes() for p in folder.glob("events.out.tfevents.*")}

    def base_row():
        table = read_events(folder)["texts"]["arena/table"].splitlines()
        return next(line for line in table if line.startswith("| base |"))

    log_new_table(["tensorboard"], tmp_path, "demo/arena", hand_table())
    first = event_files()
    assert len(first) == 1 and "| 0.1 |" in base_row()
    log_new_table(["tensorboard"], tmp_path, "demo/arena", hand_table())
    assert event_files() == first
    log_new_table([], tmp_path, "demo/arena", hand_table())  # no tracker: nothing logged
    assert event_files() == first
    changed = hand_table()
    changed["rows"][0]["metrics"]["adherence"]["value"] = 0.2
    log_new_table(["tensorboard"], tmp_path, "demo/arena", changed)
    assert event_files() != first and "| 0.2 |" in base_row()


def test_arena_report_to_reaches_its_stages_and_its_own_settings_win(tmp_path):
    from pipeline.arena import expand
    from pipeline.errors import ConfigError

    data = tiny_arena(tmp_path)
    plain, plan = expand(data, methods=["dpo", "c3po"])
    assert plan["report_to"] == [] and all("report_to" not in s.get("with", {}) for s in plain["stages"])

    data["arena"]["report_to"] = "tensorboard"
    data["arena"]["method_settings"] = {"c3po": {"report_to": "none"}}
    pipeline, plan = expand(data, methods=["dpo", "c3po"])
    stage = {s["name"]: s for s in pipeline["stages"]}
    assert plan["report_to"] == ["tensorboard"]
    for name in ("eval_base", "eval_dpo_s0", "eval_c3po_s0", "dpo_s0"):
        assert stage[name]["with"]["report_to"] == ["tensorboard"], name
    assert stage["c3po_s0"]["with"]["report_to"] == "none"  # a method's own setting wins
    with pytest.raises(ConfigError, match="arena.report_to"):
        expand({**data, "stages": data["stages"] + [{"name": "arena", "uses": "split"}]})
    with pytest.raises(ConfigError, match="arena.report_to"):
        expand({**data, "arena": {**data["arena"], "report_to": "neptune"}})


def test_a_missing_tracker_fails_before_any_work_with_the_pip_install(tmp_path, monkeypatch, tiny_model_path):
    from pipeline.arena import run_arena
    from stages.evaluate import EvaluateConfig

    from .conftest import write_yaml

    without("wandb", monkeypatch)
    with pytest.raises(ModelUnavailable, match=r"report_to: wandb needs the 'wandb' package: pip install wandb"):
        EvaluateConfig(report_to=["tensorboard", "wandb"]).trackers()
    result = run_evaluate(tmp_path, {"prompts": str(write_scoped_prompts(tmp_path))}, {"report_to": "wandb", "drift": False})
    assert not result.ok and "pip install wandb" in (result.records[0].error or "")
    assert not (result.run_dir / "check" / "summary").exists()

    data = tiny_arena(tmp_path)
    data["arena"]["report_to"] = ["tensorboard", "wandb"]
    config = write_yaml(tmp_path / "arena.yaml", data)
    runs = tmp_path / "arena_runs"
    with pytest.raises(ModelUnavailable, match="pip install wandb"):
        run_arena(config, "dpo", None, [], runs, None, True, [])
    assert not runs.exists()  # nothing planned, nothing run
