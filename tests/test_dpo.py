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
