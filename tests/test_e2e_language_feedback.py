"""C3PO (with SmolLM2 itself as the generator LLM), CUT on qa-feedback and Chain of Hindsight,
each for a couple of steps on SmolLM2-135M, then the shared evaluation on the CoH adapter."""

from __future__ import annotations

import json

import pytest

from pipeline.config import pipeline_from_dict
from pipeline.records import load_rows, write_jsonl
from pipeline.runner import Runner

from .conftest import SHARED_DATA

pytestmark = pytest.mark.slow

LEAN = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 160, "lora": {"r": 8, "alpha": 16}}
QUICK_EVAL = {"max_prompts_per_scope": 2, "sampling": {"max_new_tokens": 8, "temperature": 0.0}}


def test_language_feedback_methods_on_smollm2(tmp_path, smollm2_path):
    prefs = [
        {
            "prompt": f"What is the capital of {c}?",
            "chosen": f"The capital of {c} is {t}.",
            "rejected": "I would rather talk about trains.",
        }
        for c, t in [("France", "Paris"), ("Peru", "Lima"), ("Italy", "Rome"), ("Japan", "Tokyo")]
    ]
    write_jsonl(prefs, tmp_path / "prefs.jsonl")
    pipe = {
        "run_name": "lf",
        "model": "smollm2-135m",
        "seed": 0,
        "stages": [
            {
                "name": "data",
                "uses": "c3po_data",
                "with": {
                    "feedback": 'When I ask about cooking, start your answer with "Chef\'s tip:".',
                    "topic": "cooking",
                    "generator": {"sampling": {"max_new_tokens": 64, "temperature": 0.7}},
                    "num_categories": 2,
                    "prompts_per_category": 3,
                    "out_of_scope_categories": ["science"],
                    "eval_fraction": 0.34,
                    "baseline_sampling": {"max_new_tokens": 24},
                },
            },
            {
                "name": "c3po",
                "uses": "c3po",
                "inputs": {"data": "data.train", "eval_prompts": "data.eval_prompts"},
                "with": {**LEAN, "metric": {"kind": "starts_with", "value": "Chef's tip:"}, "evaluation": QUICK_EVAL},
            },
            {
                "name": "cut",
                "uses": "cut",
                "inputs": {"qa_feedback": str(SHARED_DATA / "qa_feedback" / "feedback_400.json")},
                "with": {**LEAN, "max_examples": 4},
            },
            {"name": "coh", "uses": "coh", "inputs": {"preferences": str(tmp_path / "prefs.jsonl")}, "with": LEAN},
            {
                "name": "check",
                "uses": "evaluate_feedback",
                "inputs": {"prompts": "data.eval_prompts", "adapter": "coh.adapter"},
                "with": {**QUICK_EVAL, "conditions": ["trained"], "metric": {"kind": "starts_with", "value": "Chef's tip:"}},
            },
        ],
    }
    result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    run = result.run_dir
    train = load_rows(run / "data" / "train")
    assert {r["scope"] for r in train} == {"in_scope", "near_scope", "out_of_scope"}
    assert all(r["baseline"] for r in train) and all(r["revised"] for r in train if r["scope"] == "in_scope")
    for stage in ("c3po", "cut", "coh"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["metrics"]["steps"] == 2
        assert (run / stage / "adapter" / "adapter_model.safetensors").is_file()
    c3po = json.loads((run / "c3po" / "manifest.json").read_text())["metrics"]
    assert c3po["first_loss"] > 0 and "adherence/trained" in c3po and "overgen_near/in_context" in c3po
    assert load_rows(run / "check" / "evaluation")
