"""DPO on the tiny model: the loss falls on a fixed toy set; the export loads and changes logits."""

from __future__ import annotations

import json

import torch

from pipeline.config import pipeline_from_dict
from pipeline.records import write_jsonl
from pipeline.runner import Runner

#: toy facts with one right answer each; test_kto and test_scale_out* train on them too
CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Chile", "Santiago"),
]


def toy_preferences(path):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is the capital of {country}?"}],
            "chosen": [{"role": "assistant", "content": f"The capital of {country} is {city}."}],
            "rejected": [{"role": "assistant", "content": "Banana banana banana banana."}],
        }
        for country, city in CAPITALS
    ]
    write_jsonl(rows, path)
    return path


def dpo_pipeline(prefs, steps=12):
    return {
        "run_name": "dpo-toy",
        "model": "tiny",
        "stages": [
            {
                "name": "align",
                "uses": "dpo",
                "inputs": {"preferences": str(prefs)},
                "with": {
                    "max_steps": steps,
                    "learning_rate": 5e-3,
                    "per_device_train_batch_size": 4,
                    "beta": 0.1,
                    "max_length": 64,
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                },
            },
            {"name": "ship", "uses": "export", "inputs": {"adapter": "align.adapter"}},
        ],
    }


def test_dpo_loss_decreases_and_export_changes_logits(tmp_path, tiny_model_path):
    prefs = toy_preferences(tmp_path / "prefs.jsonl")
    result = Runner(pipeline_from_dict(dpo_pipeline(prefs), tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    curves = json.loads((result.run_dir / "align" / "curves.json").read_text())
    losses = [row["loss"] for row in curves if "loss" in row]
    assert len(losses) == 12
    assert abs(losses[0] - 0.6931) < 0.01  # log(2): policy == reference at step 0
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1
    margins = [row["rewards/margins"] for row in curves if "rewards/margins" in row]
    assert margins[-1] > margins[0]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    package = result.run_dir / "ship" / "package"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(package))
        tuned_logits = tuned(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-3
    assert not (package / "training_args.bin").exists()

    lineage = json.loads((package / "heedful.json").read_text())
    assert lineage["base_model"]["name"] == "tiny"
    assert [s["uses"] for s in lineage["stages"]] == ["dpo"]
    assert lineage["feedback_counts"] == {"preferences": len(CAPITALS)}
    card = (package / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card


def test_reference_cached_where_the_run_reads_every_pair_else_inside_the_steps(tmp_path, tiny_model_path, monkeypatch):
    """The dpo stage caches the reference of every pair where the run reads each pair at least once
    (4 steps x 2 of 8 pairs) and computes it inside each step for a shorter run (2 steps read 4 of 8
    pairs: caching all 8 would cost twice the steps' reference). The shorter run is `max_steps: 4`
    overridden to 2 in `trainer_args`: the trainer decides from the args it runs with. The same
    losses (1e-5): the second step's loss depends on the reference, the policy having moved. The
    log and the manifest say which ran."""
    import pytest

    from .conftest import isolated_home

    monkeypatch.setenv("HEEDFUL_HOME", str(isolated_home(tmp_path / "home")))  # an empty reference cache
    prefs = toy_preferences(tmp_path / "prefs.jsonl")
    ways = {
        4: "packed DPO core; reference log-probs of every row computed in",
        2: "packed DPO core; reference log-probs inside each step",
    }
    losses, metrics = {}, {}
    for steps, line in ways.items():
        spec = dpo_pipeline(prefs, steps=4)
        # constant: the same rate in every step whatever the run's length
        spec["stages"][0]["with"].update(per_device_train_batch_size=2, lr_scheduler_type="constant")
        spec["stages"][0]["with"]["trainer_args"] = {"max_steps": steps}
        result = Runner(pipeline_from_dict(spec, tmp_path), tmp_path / f"runs-{steps}", use_ray=False).execute()
        assert result.ok, [r.error for r in result.records]
        log = (result.run_dir / "align" / "stage.log").read_text()
        assert [s for s in ways.values() if s in log] == [line], steps
        curves = json.loads((result.run_dir / "align" / "curves.json").read_text())
        losses[steps] = [row["loss"] for row in curves if "loss" in row]
        metrics[steps] = json.loads((result.run_dir / "align" / "manifest.json").read_text())["metrics"]
    assert len(losses[4]) == 4 and len(losses[2]) == 2
    assert losses[2] == pytest.approx(losses[4][:2], abs=1e-5)
    assert losses[4][1] != pytest.approx(losses[4][0], abs=1e-4)  # the policy moved: step 2 reads the reference
    assert metrics[4]["reference_seconds"] > 0 and "reference_seconds" not in metrics[2]


def test_run_passes_counts_the_batches_the_run_reads():
    """`ref_cache="auto"`'s arithmetic by hand: 8 rows in batches of 2 are 4 batches; a 9th row makes
    a 5th batch that 4 steps leave unread (unless the last, partial batch is dropped); a fraction of an
    epoch is rounded up to whole steps, as HF does (0.9 of 4 steps is 4: every row read), and an epoch's
    last accumulation group is stepped even when partial (5 batches, 2 a step: 3 steps an epoch)."""
    from types import SimpleNamespace

    from trainers.fastpref.reference import PackedReference

    def passes(rows, steps=-1, epochs=1.0, batch=2, accumulation=1, drop_last=False):
        args = SimpleNamespace(
            max_steps=steps,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            world_size=1,
            dataloader_drop_last=drop_last,
        )
        return PackedReference.run_passes(SimpleNamespace(args=args, train_dataset=range(rows)))  # type: ignore[arg-type]

    assert passes(8, steps=2) == 0.5
    assert passes(8, steps=4) == 1.0
    assert passes(8, steps=1, accumulation=4) == 1.0
    assert passes(9, steps=4) == 0.8
    assert passes(8, epochs=3.0) == 3.0
    assert passes(8, epochs=0.9) == 1.0
    assert passes(8, epochs=0.5) == 0.5
    assert passes(8, epochs=0.5, accumulation=2) == 0.5
    assert passes(9, steps=4, drop_last=True) == 1.0
    assert passes(10, epochs=0.7, accumulation=2) == 1.0  # ceil(0.7 x 3) = 3 steps: all 5 batches
    assert passes(10, steps=2, accumulation=2) == 0.8
    assert passes(10, steps=5, accumulation=2) == 1.0 + 0.8  # 3 steps an epoch, then 2 of the next
