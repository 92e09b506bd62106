"""The arena on `tiny` under real Ray, through the CLI: four methods end to end with a matched
budget, one table row per method and condition, a rerun skips everything, and a method that
fails at run time leaves the other methods' rows."""

from __future__ import annotations

import csv
import html
import json
import math
import os
import subprocess

import pytest
import yaml

from pipeline.errors import ConfigError, DataError

from .conftest import ROOT, heedful_cmd, write_yaml

METHODS = ["dpo", "kto", "c3po", "cut"]


def tiny_arena(tmp_path) -> dict:
    """configs/arena_demo.yaml on `tiny`: 5 prompts per scope (2 held out), 2 optimizer steps."""
    data = yaml.safe_load((ROOT / "configs" / "arena_demo.yaml").read_text())
    rows = [json.loads(line) for line in (ROOT / "data" / "c3po" / "cooking_prompts.jsonl").open()]
    picked = []
    for scope in ("in_scope", "near_scope", "out_of_scope"):
        mine = [r for r in rows if r["scope"] == scope][:5]
        picked += [{**r, "split": "eval" if i < 2 else "train"} for i, r in enumerate(mine)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in picked))
    data["model"] = "tiny"
    data["stages"][0]["inputs"]["prompts"] = str(prompts)
    data["stages"][0]["with"]["baseline_sampling"] = {"max_new_tokens": 8, "temperature": 0.7}
    arena = data["arena"]
    arena["methods"] = METHODS
    arena["views"] = {"finished_only": False}  # tiny's 8-token baselines never finish
    arena["budget"] = {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "learning_rate": 1e-3,
        "save_steps": 1,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    }
    arena["evaluate"] = {
        "sampling": {"max_new_tokens": 6, "temperature": 0.0},
        "max_general": 3,
        "resamples": 200,
        "memory": {"embedder": "lexical"},
    }
    return data


def heedful(*args, timeout=1200):
    env = {**os.environ, "COLUMNS": "240"}  # rich tables: whole stage names
    return subprocess.run(heedful_cmd() + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_arena_expands_into_an_ordinary_pipeline(tmp_path):
    from pipeline.arena import expand

    data = tiny_arena(tmp_path)
    pipeline, plan = expand(data, methods=["dpo", "c3po"], seeds=[0, 1])
    names = [s["name"] for s in pipeline["stages"]]
    assert names == [
        "data",
        "views",
        "eval_base",
        "dpo_s0",
        "eval_dpo_s0",
        "dpo_s1",
        "eval_dpo_s1",
        "c3po_s0",
        "eval_c3po_s0",
        "c3po_s1",
        "eval_c3po_s1",
    ]
    stage = {s["name"]: s for s in pipeline["stages"]}
    # matched budget: the same steps, LoRA and batch for every method; the seed differs only by arm
    for name in ("dpo_s0", "c3po_s1"):
        assert stage[name]["with"]["max_steps"] == 2 and stage[name]["with"]["lora"]["r"] == 4
    assert stage["dpo_s1"]["with"]["trainer_args"] == {"seed": 1, "data_seed": 1}
    assert stage["c3po_s0"]["with"]["learning_rate"] == 1e-3 and stage["c3po_s0"]["inputs"] == {"data": "data.train"}
    assert stage["dpo_s0"]["inputs"] == {"preferences": "views.preferences"}
    assert stage["eval_dpo_s0"]["inputs"]["reference"] == "eval_base.evaluation"
    assert stage["eval_dpo_s0"]["with"]["conditions"] == ["adapter"] and stage["eval_dpo_s0"]["with"]["label"] == "dpo_s0"
    assert [m["stage"] for m in plan["methods"]] == ["dpo_s0", "dpo_s1", "c3po_s0", "c3po_s1"]
    with pytest.raises(ConfigError, match="unknown method 'dpoo'"):
        expand(data, methods=["dpoo"])
    with pytest.raises(ConfigError, match="cannot use source 'users'"):
        expand({**data, "arena": {**data["arena"], "source": "users", "users": "data"}}, methods=["c3po"])


def test_arena_under_ray(tmp_path):
    data = tiny_arena(tmp_path)
    data["arena"]["report_to"] = "tensorboard"  # the table and plots go to the tracker too (tests/test_tracking.py)
    config = write_yaml(tmp_path / "arena.yaml", data)
    runs = tmp_path / "runs"
    proc = heedful("arena", str(config), "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    run_dir = runs / "arena_demo"
    table = json.loads((run_dir / "arena.json").read_text())
    conditions = [row["condition"] for row in table["rows"]]
    assert conditions == ["base", "in_context", "memory"] + [f"{m}_s0" for m in METHODS]  # one row each
    for row in table["rows"]:
        assert row["status"] == "done", row
        adherence = row["metrics"]["adherence"]
        assert adherence["n"] == 2 and adherence["lo"] <= adherence["value"] <= adherence["hi"]
        assert row["metrics"]["kl_to_base"]["n"] == 3
    for row in table["rows"][3:]:
        assert row["cost"]["steps"] == 2 and row["cost"]["train_seconds"] > 0  # the matched budget, read from manifests
        assert row["cost"]["tokens_per_second"] > 0 and row["cost"]["peak_memory_mb"] > 0
        assert row["metrics"]["kl_to_base"]["value"] > 0
    with (run_dir / "arena.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert [line["condition"] for line in lines] == conditions and "adherence_lo" in lines[0]
    report = (run_dir / "report.html").read_text()
    assert "Arena (verbal feedback)" in report and "side by side" in report and report.count("<img") >= 2
    assert list((run_dir / "arena" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "eval_dpo_s0" / "tensorboard").glob("events.out.tfevents.*"))
    # the four trained rows head to head: 6 pairs, in the CSV and under the printed table
    assert [(p["a"], p["b"]) for p in table["head_to_head"]][:3] == [
        ("dpo_s0", "kto_s0"),
        ("dpo_s0", "c3po_s0"),
        ("dpo_s0", "cut_s0"),
    ]
    assert len(table["head_to_head"]) == 6 and (run_dir / "head_to_head.csv").is_file()
    assert "head to head" in proc.stdout

    logged = {p.name: p.read_bytes() for p in (run_dir / "arena" / "tensorboard").glob("events.out.tfevents.*")}
    again = heedful("arena", str(config), "--runs-dir", str(runs))
    assert again.returncode == 0, again.stdout[-3000:]
    n_stages = 3 + 2 * len(METHODS)
    assert again.stdout.count("up to date") == n_stages
    # the same table: not logged to TensorBoard a second time (that would write another events file)
    assert {p.name: p.read_bytes() for p in (run_dir / "arena" / "tensorboard").glob("events.out.tfevents.*")} == logged
    assert "the table is unchanged, not logged to tensorboard again" in again.stdout

    status = heedful("status", "arena_demo", "--runs-dir", str(runs))
    assert status.returncode == 0 and "eval_kto_s0" in status.stdout

    # dpo with a loss TRL does not know: valid YAML, fails only when the trainer is built; --methods and
    # --seeds on the command line choose the arms (dpo and kto of the four)
    broken = heedful(
        "arena", str(config), "--runs-dir", str(runs), "--methods", "dpo,kto", "--seeds", "0",
        "--set", "arena.method_settings.dpo.loss_type=no_such_loss",
    )  # fmt: skip
    assert broken.returncode == 1
    table = json.loads((run_dir / "arena.json").read_text())
    assert [row["condition"] for row in table["rows"]] == ["base", "in_context", "memory", "dpo_s0", "kto_s0"]
    by_name = {row["condition"]: row for row in table["rows"]}
    assert by_name["dpo_s0"]["status"] == "failed" and "no_such_loss" in (by_name["dpo_s0"]["error"] or "")
    assert by_name["dpo_s0"]["metrics"] == {}
    for name in ("kto_s0", "base", "in_context", "memory"):
        assert by_name[name]["status"] == "done" and by_name[name]["metrics"]["adherence"]["n"] == 2
    assert broken.stdout.count("up to date") == 3 + 2  # data, views, eval_base, kto_s0, eval_kto_s0: only dpo_s0 tried
    # one finished trained row left: no pair, and the earlier run's head_to_head.csv is not this table's
    assert "head_to_head" not in table and not (run_dir / "head_to_head.csv").exists()


def test_arena_on_simulated_users(tmp_path):
    """Feedback source (b): the quickstart's simulated users' preferences and critiques through dpo
    and cut, judged by held-out simulated users (in-process runner: the Ray path is tested above)."""
    from pipeline.arena import load_arena, save_plan, write_outputs
    from pipeline.runner import Runner

    data = yaml.safe_load((ROOT / "configs" / "arena_users.yaml").read_text())
    data["model"] = "tiny"
    shipped, _ = load_arena(write_yaml(tmp_path / "shipped.yaml", data))
    # kto reads the users' good / needs-work judgments (both labels), not their reactions (can be all loves)
    assert shipped.stage("kto_s0").inputs["feedback"].raw == "users.verbal_feedback"
    stages = {s["name"]: s for s in data["stages"]}
    stages["sample"]["with"].update(max_prompts=4, sampling={"max_new_tokens": 8, "temperature": 1.0})
    lean_users = {
        "max_rounds": 1,
        "simulator": {"model": "tiny"},
        "policy_sampling": {"max_new_tokens": 8, "temperature": 1.0},
        "user_sampling": {"max_new_tokens": 4},
    }
    stages["users"]["with"].update({**lean_users, "max_rounds": 2})  # a revision (and so a pair) needs a second round
    data["arena"].update(
        methods=["dpo", "cut"],
        budget={"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "lora": {"r": 4, "alpha": 8}},
        grid={"dpo": {"learning_rate": [5e-5, 1e-3]}},  # tuned on validation needs (of the 4 sampled, 1)
    )
    data["arena"]["evaluate"] = {
        "sampling": {"max_new_tokens": 6, "temperature": 0.0},
        "max_general": 2,
        "resamples": 200,
        "users": lean_users,
    }
    config = write_yaml(tmp_path / "arena_users.yaml", data)
    pipeline, plan = load_arena(config)
    # with a grid every method trains on the records of the fit needs only
    assert pipeline.stage("cut_s0").inputs["feedback"].raw == "validation.verbal_feedback"
    assert pipeline.stage("dpo_g1_s0").inputs["preferences"].raw == "validation.preferences"
    assert pipeline.stage("validation").inputs["conversations"].raw == "sample.responses"  # the training needs only
    assert pipeline.stage("val_dpo_g1_s0").inputs["needs"].raw == "validation.validation"
    # MemPrompt's memory: the critiques the methods train on (never the validation or held-out needs')
    assert pipeline.stage("eval_base").inputs["memory"].raw == "validation.verbal_feedback"
    runner = Runner(pipeline, tmp_path / "runs", use_ray=False)
    save_plan(runner.run.root, plan)
    result = runner.execute()
    assert result.ok, [(r.name, r.error) for r in result.records if r.error]
    table = write_outputs(result.run_dir)
    assert [row["condition"] for row in table["rows"]] == ["base", "in_context", "memory", "dpo_s0", "cut_s0"]
    memory = next(row for row in table["rows"] if row["condition"] == "memory")
    assert memory["metrics"]["memory_retrieved"]["needs"]["n"] == 4  # recalled or not, for each held-out need
    for row in table["rows"]:
        assert row["status"] == "done"
        assert row["metrics"]["first_reply_satisfied"]["n"] == 4  # the 4 held-out needs (of 16)
        assert row["metrics"]["unfinished"]["n"] == 4
        if row["condition"] != "base":  # paired with the base's conversations on the same 4 needs
            paired = row["vs_base"]["first_reply_satisfied"]
            assert paired["n"] == 4 and paired["value"] == pytest.approx(
                row["metrics"]["first_reply_satisfied"]["value"] - table["rows"][0]["metrics"]["first_reply_satisfied"]["value"]
            )
    # the validation need: scored by each grid point, and none of its records reach training
    from pipeline.records import load_rows

    run_dir = result.run_dir
    validation = load_rows(run_dir / "validation" / "validation")
    assert len(validation) == 1 and "response" not in validation[0]
    held_out = {r["id"] for r in load_rows(run_dir / "split" / "held_out")}
    assert validation[0]["id"] not in held_out
    for name in ("preferences", "verbal_feedback", "reactions"):
        everything = load_rows(run_dir / "users" / name)
        fit = load_rows(run_dir / "validation" / name)
        kept = [r["id"] for r in everything if not r["id"].startswith(validation[0]["id"] + ":")]
        assert kept and [r["id"] for r in fit] == kept, name
    # the report shows each condition's first judged reply per need with its verdict, from the conversations
    from pipeline.arena_report import users_side_by_side

    section, checked = users_side_by_side(run_dir, shown=len(held_out)), 0
    for row in table["rows"]:
        stage = "eval_base" if row["method"] is None else f"eval_{row['condition']}"
        verdicts = json.loads((run_dir / stage / "summary").read_text())["outcomes"][row["condition"]]["first_reply_satisfied"]
        for talk in (t for t in load_rows(run_dir / stage / "conversations") if t["condition"] == row["condition"]):
            judged = next((u for u in talk["utterances"] if u["type"] == "response" and u["satisfied"] is not None), None)
            if judged is not None:
                mark = "✓" if verdicts[talk["conversation_id"]] else "✗"
                assert html.escape(f"{mark} {judged['satisfaction']:.2f}: {judged['text']}") in section
                checked += 1
    assert checked >= len(table["rows"])  # most of the 4 needs x 5 conditions were judged at their first reply
    # the chosen adapter's lineage counts the users' feedback, not the validation needs' evaluation conversations
    from pipeline.lineage import build_lineage

    counts = build_lineage(run_dir / "select_dpo_s0" / "adapter")["feedback_counts"]
    assert counts["transcripts"] == len(load_rows(run_dir / "users" / "transcripts"))
    assert "evaluation_conversations" not in counts
    (grid,) = table["grid"]
    assert grid["metric"] == "first_reply_satisfied" and grid["chosen"] in (0, 1)
    assert [p["validation"]["first_reply_satisfied"]["n"] for p in grid["points"]] == [1, 1]  # the validation need


# ----------------------------------------------------------------------------- tuning grid, variants, span feedback


def run_in_process(config, tmp_path, overrides=None):
    """Expand and run an arena file in this process (the Ray path is tested above); the run folder and table."""
    from pipeline.arena import load_arena, save_plan, write_outputs
    from pipeline.runner import Runner

    pipeline, plan = load_arena(config, overrides=overrides)
    runner = Runner(pipeline, tmp_path / "runs", use_ray=False)
    save_plan(runner.run.root, plan)
    result = runner.execute()
    assert result.ok, [(r.name, r.error) for r in result.records if r.error]
    return pipeline, result.run_dir, write_outputs(result.run_dir)


def input_texts(pipeline, run_dir, stage: str) -> set[str]:
    """Every string in the rows (or JSON) a stage read from upstream stages; adapters are weights, not text."""
    from pipeline.records import iter_rows

    texts: set[str] = set()
    for ref in pipeline.stage(stage).inputs.values():
        path = run_dir / ref.stage / ref.output if ref.stage else ref.path
        if (path / "adapter_config.json").is_file():
            continue
        if path.is_file() and not path.suffix:
            texts.add(path.read_text())  # a JSON summary: its whole text
            continue
        for _, row in iter_rows(path):
            texts.update(str(v) for v in row.values())
    return texts


def test_selection_rule():
    """Best validation metric; ties: lower overgeneralization, then fewer unfinished, then the first listed."""
    from stages.arena_select import choose

    def point(adherence=None, near=0.0, out=0.0, unfinished=0.0, **more):
        metrics = {"overgen_near": {"value": near}, "overgen_out": {"value": out}, "unfinished": {"value": unfinished}}
        if adherence is not None:
            metrics["adherence"] = {"value": adherence, "n": 10, "lo": 0.0, "hi": 1.0}
        return {**metrics, **{k: {"value": v} for k, v in more.items()}}

    assert choose([point(0.2), point(0.6), point(0.4)], "adherence") == 1
    assert choose([point(0.6, near=0.3), point(0.6, near=0.1, out=0.1)], "adherence") == 1  # mean overgen 0.15 < 0.3
    assert choose([point(0.6, unfinished=0.5), point(0.6, unfinished=0.2)], "adherence") == 1
    assert choose([point(0.6), point(0.6)], "adherence") == 0  # all equal: the first listed
    assert choose([point(None), point(0.0)], "adherence") == 1  # not measured ranks last
    assert choose([point(kl_to_base=0.3), point(kl_to_base=0.1)], "kl_to_base") == 1  # lower is better
    assert choose([point(ref_loglik=-2.0), point(ref_loglik=-1.5)], "ref_loglik") == 1
    with pytest.raises(ValueError, match="measured for no grid point"):
        choose([point(None)], "adherence")
    # scoped_adherence = adherence - mean(near, out): the suffix arena's DPO grid (docs/arena.md) chose
    # 3/5 adherence firing 5/5 near and out by adherence; in scope, 1/5 firing nowhere wins
    leaky, scoped = point(0.6, near=1.0, out=1.0), point(0.2)
    assert choose([scoped, leaky], "adherence") == 1 and choose([scoped, leaky], "scoped_adherence") == 0
    assert choose([point(0.8, near=0.2), point(0.6)], "scoped_adherence") == 0  # 0.8 - 0.1 = 0.7 beats 0.6
    assert choose([point(None), point(0.1)], "scoped_adherence") == 1  # not measured ranks last


def test_grid_and_variants_expand(tmp_path):
    from pipeline.arena import expand

    data = tiny_arena(tmp_path)
    data["arena"].update(
        grid={"dpo": {"learning_rate": [1e-3, 1e-2], "beta": [0.1, 0.3]}},
        variants={"dpo_b3": {"method": "dpo", "settings": {"beta": 0.3}}},
    )
    pipeline, plan = expand(data, methods=["dpo", "dpo_b3", "c3po"])
    stage = {s["name"]: s for s in pipeline["stages"]}
    points = [f"dpo_g{k}_s0" for k in range(4)]
    assert [stage[p]["with"]["learning_rate"] for p in points] == [1e-3, 1e-3, 1e-2, 1e-2]
    assert [stage[p]["with"]["beta"] for p in points] == [0.1, 0.3, 0.1, 0.3]
    assert stage["validation"]["inputs"] == {"data": "data.train"}  # validation comes from the training rows only
    # every method, tuned or not, trains on the same fit part
    assert stage["views"]["inputs"] == {"data": "validation.fit"} and stage["c3po_s0"]["inputs"] == {"data": "validation.fit"}
    # and MemPrompt's memory remembers the same feedback: the fit rows, not the whole of data.train
    assert stage["eval_base"]["with"]["conditions"] == ["base", "in_context", "memory"]
    assert stage["eval_base"]["inputs"]["memory"] == "validation.fit"
    assert stage["dpo_b3_s0"]["inputs"] == stage["dpo_g0_s0"]["inputs"] == {"preferences": "views.preferences"}
    assert stage["val_dpo_g2_s0"]["inputs"] == {"prompts": "validation.validation", "adapter": "dpo_g2_s0.adapter"}
    assert stage["select_dpo_s0"]["inputs"]["adapter_3"] == "dpo_g3_s0.adapter"
    assert stage["eval_dpo_s0"]["inputs"]["adapter"] == "select_dpo_s0.adapter"
    assert stage["dpo_b3_s0"]["uses"] == "dpo" and stage["dpo_b3_s0"]["with"]["beta"] == 0.3
    assert stage["eval_dpo_b3_s0"]["with"]["label"] == "dpo_b3_s0"
    sft = {s["name"]: s for s in expand(data, methods=["sft"])[0]["stages"]}["sft_s0"]
    assert sft["inputs"] == {"data": "validation.fit"}  # c3po_data rows: in-scope revisions, other scopes' baselines
    untuned = {s["name"]: s for s in expand({**data, "arena": {**data["arena"], "grid": {}}}, methods=["sft"])[0]["stages"]}
    assert untuned["sft_s0"]["inputs"] == {"data": "data.train"} and "validation" not in untuned
    assert untuned["eval_base"]["inputs"]["memory"] == "data.train"  # untuned, the methods train on all of it
    remembered = {**data, "arena": {**data["arena"], "memory": "data.train"}}  # arena.memory still wins over the grid's
    assert {s["name"]: s for s in expand(remembered)[0]["stages"]}["eval_base"]["inputs"]["memory"] == "data.train"
    users = {**data, "arena": {**data["arena"], "grid": {}, "source": "users", "users": "data"}}
    # the users source's in-context feedback comes from the critiques: wired without the memory condition too
    told = {**users, "arena": {**users["arena"], "conditions": ["base", "in_context"]}}
    assert {s["name"]: s for s in expand(told, methods=["sft"])[0]["stages"]}["eval_base"]["inputs"]["memory"] == (
        "data.verbal_feedback"
    )
    assert {s["name"]: s for s in expand(users, methods=["sft"])[0]["stages"]}["sft_s0"]["inputs"] == {
        "preferences": "data.preferences"
    }
    assert [(m["method"], m["uses"]) for m in plan["methods"]] == [("dpo", "dpo"), ("dpo_b3", "dpo"), ("c3po", "c3po")]
    held_out_readers = {s["name"] for s in pipeline["stages"] if "data.eval_prompts" in s["inputs"].values()}
    assert held_out_readers == {"eval_base", "eval_dpo_s0", "eval_dpo_b3_s0", "eval_c3po_s0"}  # the chosen point only
    with pytest.raises(ConfigError, match=r"arena.grid.dpo.no_such"):
        expand({**data, "arena": {**data["arena"], "grid": {"dpo": {"no_such": [1]}}}})
    with pytest.raises(ConfigError, match=r"arena.select_by: unknown metric 'adherance'"):
        expand({**data, "arena": {**data["arena"], "select_by": "adherance"}})
    # no better direction (the longest replies would win), or a mean over the satisfied users only
    with pytest.raises(ConfigError, match=r"arena.select_by: 'length' has no better direction"):
        expand({**data, "arena": {**data["arena"], "select_by": "length"}})
    with pytest.raises(ConfigError, match=r"arena.select_by: 'rounds' counts only the users it satisfied"):
        expand({**data, "arena": {**data["arena"], "select_by": "rounds"}})
    with pytest.raises(ConfigError, match="a method's own name"):
        expand({**data, "arena": {**data["arena"], "variants": {"kto": {"method": "dpo"}}}})
    with pytest.raises(ConfigError, match="the simulate stage 'data' to name its `conversations`"):
        expand({**data, "arena": {**data["arena"], "source": "users", "users": "data"}}, methods=["dpo"])
    with pytest.raises(ConfigError, match="source 'custom' has none"):
        expand({**data, "arena": {**data["arena"], "source": "custom"}}, methods=["dpo"])


def test_grid_selects_on_validation_only(tmp_path):
    """dpo tuned over two learning rates beside an untuned variant: the grid never reads a held-out
    prompt, the chosen point is the rule's choice on the validation scores arena.json lists, and
    only that point is evaluated on the held-out prompts (as the row dpo_s0)."""
    from stages.arena_select import choose

    data = tiny_arena(tmp_path)
    data["arena"].update(
        methods=["dpo", "dpo_b3"],
        variants={"dpo_b3": {"method": "dpo", "settings": {"beta": 0.3}}},
        grid={"dpo": {"learning_rate": [1e-3, 5e-2]}},
        validation=0.34,
        conditions=["base"],
    )
    data["arena"]["evaluate"]["drift"] = False
    pipeline, run_dir, table = run_in_process(write_yaml(tmp_path / "arena.yaml", data), tmp_path)

    from pipeline.records import load_rows

    held_out = {r["prompt"] for r in load_rows(run_dir / "data" / "eval_prompts")}
    validation = {r["prompt"] for r in load_rows(run_dir / "validation" / "validation")}
    trained = {r["prompt"] for r in load_rows(run_dir / "views" / "unpaired")}
    assert len(held_out) == 6 and len(validation) == 3  # one per scope of the three training rows each
    assert validation <= {r["prompt"] for r in load_rows(run_dir / "data" / "train")}
    assert not validation & trained and not held_out & validation
    for stage in ("validation", "views", "dpo_g0_s0", "dpo_g1_s0", "val_dpo_g0_s0", "val_dpo_g1_s0", "select_dpo_s0"):
        seen = input_texts(pipeline, run_dir, stage)
        assert not any(prompt in text for prompt in held_out for text in seen), stage

    assert [row["condition"] for row in table["rows"]] == ["base", "dpo_s0", "dpo_b3_s0"]  # one row per arm
    (grid,) = table["grid"]
    assert grid["condition"] == "dpo_s0" and [p["settings"] for p in grid["points"]] == [
        {"learning_rate": 1e-3},
        {"learning_rate": 5e-2},
    ]
    for point in grid["points"]:
        assert point["status"] == "done" and point["validation"]["adherence"]["n"] == 1  # the in-scope validation prompt
    assert grid["chosen"] == choose([p["validation"] for p in grid["points"]], "adherence")
    rows = {row["condition"]: row for row in table["rows"]}
    chosen = grid["points"][grid["chosen"]]
    assert rows["dpo_s0"]["chosen"]["settings"] == chosen["settings"] and rows["dpo_b3_s0"]["chosen"] is None
    assert rows["dpo_s0"]["metrics"]["adherence"]["n"] == 2  # held-out in-scope prompts, for the chosen point only
    assert rows["dpo_s0"]["cost"]["steps"] == 2 and rows["dpo_s0"]["cost"]["tuning_seconds"] > 0
    copied = (run_dir / "select_dpo_s0" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert copied == (run_dir / chosen["stage"] / "adapter" / "adapter_model.safetensors").read_bytes()
    assert json.loads((run_dir / "dpo_b3_s0" / "manifest.json").read_text())["config"]["beta"] == 0.3
    with (run_dir / "arena.csv").open() as f:
        assert json.loads(list(csv.DictReader(f))[1]["chosen"]) == chosen["settings"]

    # a grid point that fails blocks its method's choice (no silent choice among the rest); its row says why
    from pipeline.arena import load_arena, save_plan, write_outputs
    from pipeline.runner import Runner

    data["arena"]["grid"] = {"dpo": {"learning_rate": [1e-3], "loss_type": ["sigmoid", "no_such_loss"]}}
    pipeline, plan = load_arena(write_yaml(tmp_path / "broken.yaml", data))
    runner = Runner(pipeline, tmp_path / "runs", use_ray=False)
    save_plan(runner.run.root, plan)
    result = runner.execute()
    assert not result.ok and result.record("dpo_g0_s0").status == "skipped"  # sigmoid is the default: same point
    table = write_outputs(result.run_dir)
    rows = {row["condition"]: row for row in table["rows"]}
    assert rows["dpo_s0"]["status"] == "failed" and "no_such_loss" in rows["dpo_s0"]["error"]
    assert rows["dpo_s0"]["metrics"] == {} and rows["dpo_s0"]["chosen"] is None
    assert rows["dpo_b3_s0"]["status"] == rows["base"]["status"] == "done"
    (grid,) = table["grid"]
    assert [p["status"] for p in grid["points"]] == ["done", "failed"] and grid["chosen"] is None


@pytest.fixture
def qa_sample(tmp_path):
    """The first 8 questions of FineGrainedRLHF's qa-feedback (the shared copy)."""
    from .conftest import SHARED_DATA

    source = SHARED_DATA / "qa_feedback" / "feedback_400.json"
    if not source.is_file():
        pytest.skip(f"{source} is not here")
    path = tmp_path / "qa_feedback.json"
    path.write_text(json.dumps(json.loads(source.read_text())[:8]))
    return path


def test_arena_on_span_feedback(tmp_path, qa_sample):
    """Feedback source (c): configs/arena_spans.yaml on `tiny` through --set, kto tuned by the corrected
    answers' log-likelihood on validation questions, sft (on the corrections) untuned, ppo rewarded by the
    file's relevance reward model, trained on the training questions' spans only, which also scores every row."""
    from pipeline.arena import expand

    data = yaml.safe_load((ROOT / "configs" / "arena_spans.yaml").read_text())
    wiring = {s["name"]: s["inputs"] for s in expand(data)[0]["stages"]}
    assert wiring["dpo_s0"] == {"preferences": "views.preferences"} and wiring["cut_s0"] == {"judgments": "views.judgments"}
    assert wiring["kto_s0"] == {"feedback": "views.unpaired"}
    assert wiring["sft_s0"] == {"preferences": "views.preferences"}  # SFT on the corrections
    assert wiring["ppo_s0"]["reward_model"] == wiring["eval_base"]["reward_model"] == "relevance.reward_model"
    assert wiring["relevance"] == {"feedback": "views.train_spans"} and "reward" not in wiring  # no FLR trained

    overrides = [
        "model=tiny",
        f"arena.spans={qa_sample}",
        "arena.methods=[kto, sft, ppo]",
        "arena.method_settings.ppo={samples_per_prompt: 2, max_new_tokens: 8, ppo_epochs: 1}",
        "arena.views={held_out_fraction: 0.25}",
        "arena.grid={kto: {beta: [0.1, 0.5]}}",
        "arena.validation=0.34",
        "arena.budget={max_steps: 2, per_device_train_batch_size: 2, max_length: 64, lora: {r: 4, alpha: 8}}",
        "arena.evaluate={sampling: {max_new_tokens: 6, temperature: 0.0}, max_general: 2, resamples: 200, feedback: Be brief.}",
        "stages.relevance.with.num_train_epochs=1",
        "stages.relevance.with.max_length=128",
    ]
    pipeline, run_dir, table = run_in_process(ROOT / "configs" / "arena_spans.yaml", tmp_path, overrides)
    from pipeline.records import load_rows

    held_out = {r["prompt"] for r in load_rows(run_dir / "views" / "eval_prompts")}
    validation = {r["prompt"] for r in load_rows(run_dir / "views" / "validation_prompts")}
    trained = {r["prompt"] for r in load_rows(run_dir / "views" / "unpaired")}
    assert (len(held_out), len(validation), len(trained)) == (2, 2, 4)  # 8 questions: 2 held out, 2 of the rest validate
    assert not held_out & trained and not validation & trained
    # the reward model's spans: prediction 1 of exactly the training questions, prompted as the methods see them
    spans = load_rows(run_dir / "views" / "train_spans")
    assert {r["prompt"] for r in spans} == trained and len(spans) == len(trained)
    answers = load_rows(run_dir / "views" / "eval_answers")  # a question annotators left uncorrected has none
    assert {r["prompt"] for r in answers} <= held_out and answers
    assert [row["condition"] for row in table["rows"]] == ["base", "in_context", "kto_s0", "sft_s0", "ppo_s0"]
    for row in table["rows"]:
        assert row["status"] == "done", row
        assert row["metrics"]["unfinished"]["n"] == 2
        assert row["metrics"]["ref_loglik"]["n"] == len(answers)  # log-likelihood of the held-out corrections
        assert "adherence" not in row["metrics"]  # no scoped prompts: nothing to adhere to
        assert row["metrics"]["reward/fine_grained"]["n"] == 2  # the relevance RM scores every row's replies
        if row["condition"] != "base":  # scores paired with the base's on the same questions, beside the rates
            paired = row["vs_base"]
            assert paired["reward/fine_grained"]["n"] == 2 and paired["ref_loglik"]["n"] == len(answers)
            assert {"p", "better", "worse"} <= set(paired["ref_loglik"]) and "unfinished" in paired
    summary = json.loads((run_dir / "eval_sft_s0" / "summary").read_text())
    per_item = summary["scores"]["sft_s0"]["ref_loglik"]  # each held-out correction's log-likelihood
    assert sum(per_item.values()) / len(per_item) == pytest.approx(summary["conditions"]["sft_s0"]["ref_loglik"]["value"])
    # ppo: rollouts against the relevance reward model; a training cost of its own
    ppo = table["rows"][-1]
    assert ppo["metrics"]["kl_to_base"]["value"] > 0 and ppo["cost"]["steps"] == 2
    assert ppo["cost"]["tokens_per_second"] > 0 and ppo["cost"]["peak_memory_mb"] > 0
    reward = json.loads((run_dir / "relevance" / "reward_model" / "reward_model.json").read_text())
    assert reward["kind"] == "fine_grained"
    (grid,) = table["grid"]
    assert table["tuning"]["select_by"] == "ref_loglik" and grid["metric"] == "ref_loglik"
    assert grid["chosen"] == [p["validation"]["ref_loglik"]["value"] for p in grid["points"]].index(
        max(p["validation"]["ref_loglik"]["value"] for p in grid["points"])
    )
    from pipeline.report import build_report

    build_report(run_dir)
    report = (run_dir / "report.html").read_text()
    assert "Arena (spans feedback)" in report and "Tuning grid" in report and "(chosen)" in report


def test_span_views_train_spans_are_prompted_as_the_other_views(qa_sample):
    """With the passages in the prompt, the reward model's spans carry the same prompt text as the
    methods' rows (the judged instruction), and only the training items' spans are written."""
    from stages.span_views import judge, split_questions, training_spans

    questions = judge(qa_sample, None, True)
    parts = split_questions(len(questions), 0.25, 0.0, 0, str(qa_sample))
    spans = training_spans(qa_sample, questions, parts["train"])
    assert [r["prompt"] for r in spans] == [questions[i][0]["instruction"] for i in parts["train"]]
    assert all("Passages:" in r["prompt"] for r in spans)
    assert [r["id"] for r in spans] == [f"qa-{i}" for i in parts["train"]]
    assert [r["response"] for r in spans] == [questions[i][0]["response"] for i in parts["train"]]  # prediction 1


def test_arena_reward_settings_with_no_arena_trained_reward_model_are_an_error():
    """arena_spans.yaml's ppo reads the relevance stage's reward model: FLR settings would be ignored."""
    from pipeline.arena import expand
    from pipeline.errors import ConfigError

    data = yaml.safe_load((ROOT / "configs" / "arena_spans.yaml").read_text())
    data["arena"]["reward"] = {"followup": {"per_aspect": 1}}
    with pytest.raises(ConfigError, match="arena.reward"):
        expand(data)
    expand(data, methods=["dpo"])  # no ppo arm in this run: the block is idle, as other methods' settings are


def test_ppo_arm_trains_against_a_reward_model_of_the_same_preferences(tmp_path):
    """PPO as an arena arm: a `reward` stage fine-tunes FLR on the preferences the pairwise methods
    read, PPO samples the same prompts against it, and the budget maps onto PPO's own settings
    (rollouts of `prompts_per_step` prompts) with the arm's seed. (It runs in the span arena below.)"""
    from pipeline.arena import expand

    data = tiny_arena(tmp_path)
    data["arena"].update(methods=["ppo"], seeds=[1], conditions=["base"])
    stages = {s["name"]: s for s in expand(data)[0]["stages"]}
    assert stages["reward"]["uses"] == "train_reward" and stages["reward"]["inputs"] == {"feedback": "views.preferences"}
    assert stages["reward"]["with"]["kind"] == "followup" and stages["reward"]["with"]["max_steps"] == 2
    ppo = stages["ppo_s1"]
    assert ppo["inputs"] == {"prompts": "views.preferences", "reward_model": "reward.reward_model"}
    assert (ppo["with"]["steps"], ppo["with"]["prompts_per_step"], ppo["with"]["seed"]) == (2, 2, 1)
    assert "max_steps" not in ppo["with"] and "max_length" not in ppo["with"]
    # FLR's settings merge key by key (fine-tuning stays on); a reward model of the user's own replaces the
    # arena's; a kind that cannot read preferences is refused, naming the way to wire one
    context = {**data, "arena": {**data["arena"], "reward": {"followup": {"include_context": True}}}}
    reward = {s["name"]: s for s in expand(context)[0]["stages"]}["reward"]["with"]
    assert reward["followup"] == {"finetune": True, "include_context": True}
    mine = {**data, "arena": {**data["arena"], "inputs": {"ppo": {"reward_model": "rm.reward_model"}}}}
    assert "reward" not in {s["name"] for s in expand(mine)[0]["stages"]}
    with pytest.raises(ConfigError, match="arena.inputs.ppo.reward_model"):
        expand({**data, "arena": {**data["arena"], "reward": {"kind": "plove"}}})
    # an arm rewarded by rules only (the feedback's own metric) reads no reward model: none is trained for it,
    # while an arm beside it that reads one still gets the reward stage
    rule = {"rule": "feedback_metric", "metric": {"kind": "starts_with", "value": "Chef's tip:"}}
    ruled = {
        **data,
        "arena": {
            **data["arena"],
            "methods": ["ppo_rule"],
            "variants": {"ppo_rule": {"method": "ppo", "settings": {"objectives": [{"rule": rule}]}}},
        },
    }
    stages = {s["name"]: s for s in expand(ruled)[0]["stages"]}
    assert "reward" not in stages and stages["ppo_rule_s1"]["inputs"] == {"prompts": "views.preferences"}
    ruled["arena"]["methods"] = ["ppo", "ppo_rule"]
    stages = {s["name"]: s for s in expand(ruled)[0]["stages"]}
    assert "reward" in stages and stages["ppo_s1"]["inputs"]["reward_model"] == "reward.reward_model"
    assert "reward_model" not in stages["ppo_rule_s1"]["inputs"]
    # the evaluation may score with the arena's reward model only when some arm trains it
    scored = {**ruled["arena"], "evaluate_inputs": {"reward_model": "reward.reward_model"}}
    assert "reward" in {s["name"] for s in expand({**ruled, "arena": scored})[0]["stages"]}
    with pytest.raises(ConfigError, match="arena.evaluate_inputs.reward_model: 'reward.reward_model'.*none in this run"):
        expand({**ruled, "arena": {**scored, "methods": ["ppo_rule"]}})
    # a grid over the objectives: the reward stage is there as soon as one point reads the reward model
    ruled["arena"].update(
        methods=["ppo_rule"], grid={"ppo_rule": {"objectives": [[{"rule": rule}], [{"input": "reward_model"}]]}}
    )
    stages = {s["name"]: s for s in expand(ruled)[0]["stages"]}
    assert "reward" in stages and stages["ppo_rule_g1_s1"]["inputs"]["reward_model"] == "reward.reward_model"


def test_a_variant_trains_on_from_another_arms_adapter(tmp_path):
    """`after: sft` (SFT then PPO): each seed's arm reads the same seed's SFT adapter, or the selected
    grid point's when SFT is tuned; its own `inputs` fill {train} and {seed}; the arm it starts from
    must run too, a loop or a method without an adapter input is refused by name."""
    from pipeline.arena import expand

    data = tiny_arena(tmp_path)
    rule = {"rule": "feedback_metric", "metric": {"kind": "starts_with", "value": "Chef's tip:"}}
    chained = {
        "method": "ppo",
        "after": "sft",
        "inputs": {"prompts": "{train}", "eval_prompts": "data_{seed}.eval_prompts"},
        "settings": {"objectives": [{"rule": rule}]},
    }
    data["arena"].update(methods=["sft", "sft_ppo"], seeds=[0, 1], variants={"sft_ppo": chained})
    pipeline, plan = expand(data)
    stages = {s["name"]: s for s in pipeline["stages"]}
    for seed in (0, 1):
        assert stages[f"sft_ppo_s{seed}"]["inputs"] == {
            "prompts": "data.train",  # every scope's prompts, each with its scope
            "eval_prompts": f"data_{seed}.eval_prompts",
            "adapter": f"sft_s{seed}.adapter",
        }
    assert "reward" not in stages  # rule-rewarded
    assert [m.get("after") for m in plan["methods"]] == [None, None, "sft_s0", "sft_s1"]
    # the shipped demo's variant builds into a valid pipeline: PPO's prompts take the c3po_data rows
    from pipeline.arena import load_arena

    pipeline, _ = load_arena(ROOT / "configs" / "arena_demo.yaml", methods=["sft", "sft_ppo"], seeds=[0])
    assert {s.spec.name for s in pipeline.stages} >= {"sft_s0", "sft_ppo_s0", "eval_sft_ppo_s0"}
    tuned = {**data, "arena": {**data["arena"], "seeds": [0], "grid": {"sft": {"learning_rate": [1e-3, 1e-2]}}}}
    stages = {s["name"]: s for s in expand(tuned)[0]["stages"]}
    assert stages["sft_ppo_s0"]["inputs"]["adapter"] == "select_sft_s0.adapter"
    assert stages["sft_ppo_s0"]["inputs"]["prompts"] == "validation.fit"  # the fit part, as every method's
    with pytest.raises(ConfigError, match="list sft among the methods too"):
        expand(data, methods=["sft_ppo"])
    looped = {"a": {"method": "ppo", "after": "b"}, "b": {"method": "ppo", "after": "a"}}
    with pytest.raises(ConfigError, match="a loop: a -> b -> a"):
        expand({**data, "arena": {**data["arena"], "variants": looped}}, methods=["a", "b"])
    rm_after = {
        **data["arena"],
        "inputs": {"train_reward": {"feedback": "views.preferences"}},
        "variants": {"rm_after": {"method": "train_reward", "after": "sft"}},
    }
    with pytest.raises(ConfigError, match="variants.rm_after.after: method 'train_reward' cannot continue an adapter"):
        expand({**data, "arena": rm_after}, methods=["sft", "rm_after"])
    bad = {**chained, "inputs": {"prompts": "{nope}.train"}}
    with pytest.raises(ConfigError, match=r"variants.sft_ppo.inputs.prompts: cannot fill '\{nope\}.train'"):
        expand({**data, "arena": {**data["arena"], "variants": {"sft_ppo": bad}}})


def test_ppo_reads_every_scopes_prompts_with_their_scope(tmp_path):
    """c3po_data rows keep their scope (another value is none); grouped by scope as they come, they are
    shuffled with the seed before a limit takes its share, so the first 12 of 30 are not all in scope."""
    from stages.ppo import load_prompts

    scopes = ["in_scope"] * 10 + ["near_scope"] * 10 + ["out_of_scope"] * 9 + ["general"]
    rows = [{"prompt": f"Question {i}?", "scope": scope} for i, scope in enumerate(scopes)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    every = load_prompts(path, "prompt", None, "prompts")
    assert sorted(map(str, (p.scope for p in every))) == sorted(map(str, scopes[:-1] + [None]))
    assert {p.reward_prompt: p.scope for p in every}["Question 29?"] is None
    first = load_prompts(path, "prompt", 12, "prompts", seed=3)
    assert len({p.scope for p in first} - {None}) == 3  # every scope among the first 12
    assert [p.id for p in first] == [p.id for p in load_prompts(path, "prompt", 12, "prompts", seed=3)]  # seeded
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"Q{i}"}) + "\n" for i in range(5)))
    assert [p.reward_prompt for p in load_prompts(plain, "prompt", 3, "prompts")] == ["Q0", "Q1", "Q2"]  # kept in order


# ----------------------------------------------------------------------------- seeds aggregated


def test_aggregate_metric_by_hand():
    """Rates pool their counts (Wilson on the pooled share); means weight by n and take the envelope
    of the seeds' intervals; bare numbers average; a metric no seed measured is left out."""
    from pipeline.arena_table import aggregate_metric
    from pipeline.stats import wilson

    rate = aggregate_metric("adherence", [wilson(3, 5), wilson(4, 5)])
    assert rate["value"] == 0.7 and rate["n"] == 10
    assert (rate["lo"], rate["hi"]) == (wilson(7, 10)["lo"], wilson(7, 10)["hi"])
    assert rate["per_seed"] == [0.6, 0.8] and (rate["seed_min"], rate["seed_max"]) == (0.6, 0.8) and rate["seeds"] == 2
    kl = aggregate_metric(
        "kl_to_base",
        [{"value": 0.1, "n": 10, "lo": 0.05, "hi": 0.2}, {"value": 0.4, "n": 30, "lo": 0.3, "hi": 0.5}],
    )
    assert kl["value"] == pytest.approx((0.1 * 10 + 0.4 * 30) / 40) and kl["n"] == 40
    assert (kl["lo"], kl["hi"]) == (0.05, 0.5)
    assert aggregate_metric("length_vs_base", [1.0, 1.2]) == pytest.approx(1.1)
    assert aggregate_metric("judge_win_rate", [None, None]) is None
    nan = {"value": None, "n": 0, "lo": None, "hi": None}  # an estimate over no items does not count
    assert aggregate_metric("adherence", [nan, wilson(1, 4)])["n"] == 4
    # a seed whose values were all alike has no interval (null in JSON): the envelope of the other
    # seed's would pass for the spread of both, so the mean over seeds has none either, not a narrower one
    alike = {"value": 2.0, "n": 5, "lo": None, "hi": None}
    ratio = aggregate_metric("length_vs_base", [alike, {"value": 1.0, "n": 5, "lo": 0.9, "hi": 1.1}])
    assert ratio["value"] == pytest.approx(1.5) and math.isnan(ratio["lo"]) and math.isnan(ratio["hi"])
    assert ratio["interval"].startswith("none") and ratio["per_seed"] == [2.0, 1.0]


def test_aggregate_of_a_chained_arm_names_the_arm_it_continued():
    """Per-seed rows of a chained arm name the stage each seed started from; the mean over seeds
    names the arm (sft, not sft_s0), and an unchained method's aggregate has no `after`."""
    from pipeline.arena_table import aggregate_seeds

    def row(method, seed, after=None):
        r = {"method": method, "seed": seed, "status": "done", "metrics": {}, "cost": {}, "error": None}
        return {**r, "after": after} if after else r

    rows = [row("sft", 0), row("sft", 1), row("sft_ppo", 0, "sft_s0"), row("sft_ppo", 1, "sft_s1")]
    by_method = {a["method"]: a for a in aggregate_seeds(rows)}
    assert by_method["sft_ppo"]["after"] == "sft"
    assert "after" not in by_method["sft"]


def test_a_chained_arm_is_paired_with_the_arm_it_continued(tmp_path):
    """C3PO trained on from SFT's adapter: its row is paired with sft_s0's replies on the same held-out
    prompts (`vs_start`, by hand from the replies on disk), in arena.csv, the report and the printed
    table; the arm it continued has no such pairing."""
    from pipeline.records import load_rows
    from pipeline.stats import paired_difference

    data = tiny_arena(tmp_path)
    data["arena"].update(
        methods=["sft", "sft_c3po"],
        seeds=[0],
        conditions=["base"],
        variants={"sft_c3po": {"method": "c3po", "after": "sft"}},
    )
    data["arena"]["method_settings"]["sft"] = {"finished_only": False}  # tiny's 8-token replies never finish
    config = write_yaml(tmp_path / "arena.yaml", data)
    _, run_dir, table = run_in_process(config, tmp_path)
    rows = {row["condition"]: row for row in table["rows"]}
    assert "vs_start" not in rows["sft_s0"] and rows["sft_c3po_s0"]["after"] == "sft_s0"

    def outcomes(stage, scope):
        return {r["prompt"]: r["applied"] for r in load_rows(run_dir / stage / "evaluation") if r["scope"] == scope}

    for metric, scope in (("adherence", "in_scope"), ("overgen_near", "near_scope")):
        by_hand = paired_difference(outcomes("eval_sft_c3po_s0", scope), outcomes("eval_sft_s0", scope))
        assert {k: rows["sft_c3po_s0"]["vs_start"][metric][k] for k in by_hand} == by_hand and by_hand["n"] == 2
    with (run_dir / "arena.csv").open() as f:
        lines = {line["condition"]: line for line in csv.DictReader(f)}
    assert lines["sft_c3po_s0"]["adherence_vs_start_p"] == f"{rows['sft_c3po_s0']['vs_start']['adherence']['p']:.6g}"
    assert lines["sft_s0"]["adherence_vs_start_p"] == ""
    from pipeline.report import build_report

    build_report(run_dir)
    page = (run_dir / "report.html").read_text()
    assert "Paired with the arm it continued" in page and "sft_c3po_s0 vs sft_s0" in page
    from rich.console import Console

    from pipeline.arena_report import print_table

    console = Console(record=True, width=240)
    print_table(console, table)
    assert "sft_c3po_s0 vs sft_s0" in console.export_text()
    # the two trained rows head to head: the arm it continued less the chain, i.e. vs_start read backwards
    from pipeline.arena_head_to_head import flipped

    (pair,) = table["head_to_head"]
    assert (pair["a"], pair["b"], pair["seed"]) == ("sft_s0", "sft_c3po_s0", 0)
    backwards = flipped(rows["sft_c3po_s0"]["vs_start"])
    assert set(pair["paired"]) == set(backwards)
    for metric, d in backwards.items():  # Newcombe's interval with its operands swapped: equal to rounding
        assert {k: v for k, v in pair["paired"][metric].items() if k != "p_holm"} == pytest.approx(d), metric
    assert all(d["p_holm"] == d["p"] for d in pair["paired"].values())  # one pair: nothing to adjust
    with (run_dir / "head_to_head.csv").open() as f:
        assert {line["metric"] for line in csv.DictReader(f)} == set(pair["paired"])
    assert "Trained rows head to head" in page
    from typer.testing import CliRunner

    from pipeline.cli import app

    shown = CliRunner().invoke(app, ["compare", str(run_dir), "sft_c3po_s0", "sft_s0"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "sft_c3po_s0 less sft_s0" in shown.output and "adherence" in shown.output
    unknown = CliRunner().invoke(app, ["compare", str(run_dir), "sft", "base"], env={"COLUMNS": "200"})
    assert unknown.exit_code == 2 and "one row per seed: sft_s0" in unknown.output
    untrained = CliRunner().invoke(app, ["compare", str(run_dir), "base", "sft_s0"], env={"COLUMNS": "200"})
    assert untrained.exit_code == 0 and "this comparison's alone" in untrained.output  # not a trained pair: no Holm p
    # tiny's replies rarely apply the feedback: give the start other outcomes than the base's and the
    # pairing must follow the start's (every start prompt adhered: the chain's misses count as worse)
    from pipeline.arena import write_outputs

    summary_file = run_dir / "eval_sft_s0" / "summary"
    start = json.loads(summary_file.read_text())
    adherence = start["outcomes"]["sft_s0"]["adherence"]
    start["outcomes"]["sft_s0"]["adherence"] = dict.fromkeys(adherence, True)
    summary_file.write_text(json.dumps(start))
    chain = next(row for row in write_outputs(run_dir)["rows"] if row["condition"] == "sft_c3po_s0")
    mine = outcomes("eval_sft_c3po_s0", "in_scope")
    assert chain["vs_start"]["adherence"] == {
        **paired_difference(mine, dict.fromkeys(adherence, True)),
        "better": 0,
        "worse": sum(not v for v in mine.values()),
    }
    assert chain["vs_start"]["adherence"]["worse"] > chain["vs_base"]["adherence"]["worse"]


def test_two_seeds_aggregated(tmp_path):
    """dpo with seeds 0 and 1 on `tiny`: arena.json keeps one row per seed and adds the method's mean
    over seeds (pooled counts with Wilson for rates, n-weighted means), arena.csv and the report show
    it above the seeds' rows; a seed that fails leaves an aggregate of the other, marked 1/2."""
    from pipeline.arena_table import aggregate_metric
    from pipeline.stats import wilson

    data = tiny_arena(tmp_path)
    data["arena"].update(methods=["dpo"], seeds=[0, 1], conditions=["base", "in_context"])
    config = write_yaml(tmp_path / "arena.yaml", data)
    _, run_dir, table = run_in_process(config, tmp_path)
    assert [row["condition"] for row in table["rows"]] == ["base", "in_context", "dpo_s0", "dpo_s1"]
    (mean,) = table["aggregates"]
    seeds = [table["rows"][2]["metrics"], table["rows"][3]["metrics"]]
    assert mean["condition"] == "dpo (mean over seeds 0, 1)" and mean["seeds"] == [0, 1] and mean["status"] == "done"
    pooled = sum(round(s["adherence"]["value"] * s["adherence"]["n"]) for s in seeds)
    assert mean["metrics"]["adherence"]["n"] == 4  # 2 held-out in-scope prompts per seed
    assert mean["metrics"]["adherence"]["hi"] == wilson(pooled, 4)["hi"]
    assert mean["metrics"]["adherence"]["per_seed"] == [s["adherence"]["value"] for s in seeds]
    kl = mean["metrics"]["kl_to_base"]
    assert kl["n"] == 6 and kl["value"] == pytest.approx(sum(s["kl_to_base"]["value"] for s in seeds) / 2)
    assert kl["lo"] == min(s["kl_to_base"]["lo"] for s in seeds) and kl["hi"] == max(s["kl_to_base"]["hi"] for s in seeds)
    assert mean["cost"]["steps"] == 2
    assert mean["metrics"]["unfinished"] == aggregate_metric("unfinished", [s["unfinished"] for s in seeds])
    # each seed against the base on the same held-out prompts, from the replies on disk
    from pipeline.records import load_rows
    from pipeline.stats import paired_difference

    def applied(stage, condition=None):
        rows = load_rows(run_dir / stage / "evaluation")
        return {
            r["prompt"]: r["applied"]
            for r in rows
            if r["scope"] == "in_scope" and r["condition"] == (condition or r["condition"])
        }

    assert "vs_base" not in table["rows"][0] and "vs_in_context" not in table["rows"][0]  # the base itself
    assert set(table["rows"][1]) >= {"vs_base"} and "vs_in_context" not in table["rows"][1]  # in_context: vs the base
    for row in table["rows"][2:]:
        in_context = paired_difference(applied(f"eval_{row['condition']}"), applied("eval_base", "in_context"))
        assert row["vs_in_context"]["adherence"]["value"] == in_context["value"]
        assert row["vs_in_context"]["adherence"]["turned_yes"] == in_context["turned_yes"]
    for row in table["rows"][2:]:
        by_hand = paired_difference(applied(f"eval_{row['condition']}"), applied("eval_base", "base"))
        better = {"better": by_hand["turned_yes"], "worse": by_hand["turned_no"]}
        assert row["vs_base"]["adherence"] == {**by_hand, **better} and by_hand["n"] == 2
        unfinished = row["vs_base"]["unfinished"]  # lower is better: an item that turned no is better
        assert (unfinished["better"], unfinished["worse"]) == (unfinished["turned_no"], unfinished["turned_yes"])
        # the rates, and a score since evaluate v5: each general answer's log-likelihood against the base's
        assert set(row["vs_base"]) == {"adherence", "overgen_near", "overgen_out", "unfinished", "ref_loglik"}
    # the mean over seeds against the base: per prompt the share of seeds that adhered less the base's,
    # with Newcombe's interval on the seed-averaged table
    from pipeline.stats import mcnemar_p, newcombe

    base_applied, seeds_applied = applied("eval_base", "base"), [applied(f"eval_dpo_s{s}") for s in (0, 1)]
    shares = [(sum(a[p] for a in seeds_applied) / 2, base_applied[p]) for p in base_applied]
    diffs = [share - base for share, base in shares]
    up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    seed_mean = mean["vs_base"]["adherence"]
    table_cells = (
        sum(share * base for share, base in shares),
        sum(share * (1 - base) for share, base in shares),
        sum((1 - share) * base for share, base in shares),
    )
    assert seed_mean["value"] == pytest.approx(sum(diffs) / len(diffs))
    assert {k: seed_mean[k] for k in ("value", "lo", "hi", "n")} == pytest.approx(
        {k: newcombe(*table_cells, len(shares))[k] for k in ("value", "lo", "hi", "n")}
    )
    assert seed_mean["lo"] < seed_mean["hi"]  # never a point, even where every prompt agrees
    assert (seed_mean["better"], seed_mean["worse"], seed_mean["p"], seed_mean["seeds"]) == (up, down, mcnemar_p(up, down), 2)
    loglik = mean["vs_base"]["ref_loglik"]  # a score's seed mean: the seeds averaged per answer, then paired
    assert loglik["seeds"] == 2 and loglik["n"] == table["rows"][2]["vs_base"]["ref_loglik"]["n"] > 0
    with (run_dir / "arena.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert [(line["condition"], line["seed"]) for line in lines] == [
        ("base", ""),
        ("in_context", ""),
        ("dpo (mean over seeds 0, 1)", "0+1"),
        ("dpo_s0", "0"),
        ("dpo_s1", "1"),
    ]
    assert lines[2]["adherence_n"] == "4"
    assert lines[3]["adherence_vs_base_p"] == f"{table['rows'][2]['vs_base']['adherence']['p']:.6g}"
    assert lines[2]["adherence_vs_base_better"] == str(mean["vs_base"]["adherence"]["better"])  # the mean over seeds too
    assert lines[3]["adherence_vs_in_context"] == f"{table['rows'][2]['vs_in_context']['adherence']['value']:.6g}"
    assert "vs_in_context" in mean and lines[1]["adherence_vs_in_context"] == ""
    from pipeline.report import build_report

    build_report(run_dir)
    assert "<b>dpo (mean over seeds 0, 1)</b>" in (run_dir / "report.html").read_text()
    assert "Paired with the base" in (run_dir / "report.html").read_text()
    assert "Paired with the feedback in the prompt" in (run_dir / "report.html").read_text()
    from rich.console import Console

    from pipeline.arena_report import print_table

    console = Console(record=True, width=240)
    print_table(console, table)  # what `heedful arena` prints at the end
    cells = [line.split("│")[1].strip() for line in console.export_text().splitlines() if line.startswith("│")]
    printed = [name for name in cells if name]  # a row whose cells wrap continues on lines with no name
    trained = ["dpo (mean over seeds 0, 1)", "dpo_s0", "dpo_s1"]
    # the table, then against the base (in_context too), then against the feedback in the prompt
    assert printed == ["base", "in_context", *trained, "in_context", *trained, *trained]

    # tiny's greedy replies are blank, so every adherence outcome above is False and the pairings compare
    # nothing (0 better, 0 worse). Give the conditions outcomes of their own on the two prompts and the
    # table must pair each seed with the right reference, item by item, in the right direction.
    from pipeline.arena import write_outputs as rewrite

    def set_adherence(stage, condition, values):
        path = run_dir / stage / "summary"
        summary = json.loads(path.read_text())
        items = sorted(summary["outcomes"][condition]["adherence"])
        assert len(items) == 2
        summary["outcomes"][condition]["adherence"] = dict(zip(items, values))
        path.write_text(json.dumps(summary))

    kept = {stage: (run_dir / stage / "summary").read_bytes() for stage in ("eval_base", "eval_dpo_s0", "eval_dpo_s1")}
    set_adherence("eval_base", "base", [False, True])
    set_adherence("eval_base", "in_context", [True, True])
    set_adherence("eval_dpo_s0", "dpo_s0", [True, False])
    set_adherence("eval_dpo_s1", "dpo_s1", [True, True])
    given = rewrite(run_dir)
    rows = {row["condition"]: row for row in given["rows"]}

    def moved(row, against):
        return (row[against]["adherence"]["better"], row[against]["adherence"]["worse"])

    assert moved(rows["in_context"], "vs_base") == (1, 0)
    assert moved(rows["dpo_s0"], "vs_base") == (1, 1) and moved(rows["dpo_s1"], "vs_base") == (1, 0)
    assert moved(rows["dpo_s0"], "vs_in_context") == (0, 1) and moved(rows["dpo_s1"], "vs_in_context") == (0, 0)
    seeds_mean = given["aggregates"][0]["vs_base"]["adherence"]  # per prompt: (1 + 1) / 2 - 0 and (0 + 1) / 2 - 1
    assert (seeds_mean["better"], seeds_mean["worse"]) == (1, 1) and seeds_mean["value"] == pytest.approx(0.25)
    for stage, blob in kept.items():
        (run_dir / stage / "summary").write_bytes(blob)

    # seed 1 fails at run time: the mean is seed 0's alone, and says so
    from pipeline.arena import load_arena, save_plan, write_outputs
    from pipeline.runner import Runner

    pipeline, plan = load_arena(config, overrides=["stages.dpo_s1.with.loss_type=no_such_loss"])
    runner = Runner(pipeline, tmp_path / "runs", use_ray=False)
    save_plan(runner.run.root, plan)
    assert not runner.execute().ok
    (mean,) = write_outputs(run_dir)["aggregates"]
    assert mean["status"] == "1/2 seeds done" and mean["seeds"] == [0] and "seed 1" in mean["error"]
    assert mean["metrics"]["adherence"]["n"] == 2 and mean["metrics"]["adherence"]["per_seed"] == [seeds[0]["adherence"]["value"]]


def test_needs_validation_keeps_a_needs_samples_together_and_names_stray_records():
    """The users' validation split is by need: a need's samples land on one side, records find
    their need by provenance or id, and a record of no listed need is an error naming it."""
    from stages.needs_validation import need_key, need_of_record, pick_validation, user_id, validation_rows

    rows = [
        {"id": f"r{k}", "prompt_id": f"n{k}", "sample_index": s, "need": f"need {k}", "prompt": "q", "response": "a"}
        for k in range(8)
        for s in range(2)
    ]
    need_of = {user_id(r, i): need_key(r, i) for i, r in enumerate(rows)}
    assert need_of["n3:1"] == "n3" and len(set(need_of.values())) == 8
    chosen = pick_validation(sorted(set(need_of.values())), 0.25, seed=0, where="needs")
    assert len(chosen) == 2 and chosen == pick_validation(sorted(set(need_of.values())), 0.25, seed=0, where="needs")
    # one row per validation need, named by it, without generate's fields (evaluate answers it afresh)
    picked = validation_rows(rows, chosen)
    assert sorted(r["id"] for r in picked) == sorted(chosen)
    assert all(set(r) == {"id", "need", "prompt"} for r in picked)
    assert need_of_record({"id": "x", "provenance": {"dataset": "n5:0"}}, need_of, "r") == "n5"
    assert need_of_record({"id": "n6:1:pair2-4"}, need_of, "r") == "n6"
    assert need_of_record({"id": "n7:0:t3"}, need_of, "r") == "n7"
    # bad input is a DataError (one clear message), not an "unexpected error" with a traceback
    with pytest.raises(DataError, match=r"reactions row 4: field 'id' 'other:0:t1' names no need"):
        need_of_record({"id": "other:0:t1"}, need_of, "reactions row 4")
    with pytest.raises(DataError, match="at least 2"):
        pick_validation(["only"], 0.25, seed=0, where="needs")
