"""P[Love] through the train_reward stage on the tiny model: learns a reaction cue, splits by
time, caps heavy users, loads back with load_reward_model, and reports calibration."""

from __future__ import annotations

import json
import random

import torch

from pipeline.config import pipeline_from_dict
from pipeline.records import write_jsonl
from pipeline.runner import Runner
from reward_models.base import RewardBatch, load_reward_model
from reward_models.metrics import auroc

GOOD = ["Sure! Here is a clear answer with an example.", "Great question, here are the steps with details."]
BAD = ["No.", "I don't know, figure it out."]


def production_logs(path, n=96, seed=0):
    """Logs in the production format: conversation, reply, reaction, user id, time. Good replies
    get 'love' 70% of the time, bad ones 5%; one heavy user logs a third of everything."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        reply = rng.choice(GOOD if good else BAD)
        love = rng.random() < (0.7 if good else 0.05)
        user = "heavy" if i % 3 == 0 else f"user{i % 7}"
        rows.append(
            {
                "conversation": [{"role": "user", "content": f"How do I do task {i}?"}],
                "reply": reply,
                "reaction": "love" if love else rng.choice(["dislike", "neutral"]),
                "user_id": user,
                "time": f"2025-01-{1 + i // 4:02d}T{i % 24:02d}:00:00Z",
            }
        )
    write_jsonl(rows, path)
    return rows


def test_plove_learns_reactions_and_reports_calibration(tmp_path, tiny_model_path):
    rows = production_logs(tmp_path / "logs.jsonl")
    data = {
        "run_name": "plove",
        "model": "tiny",
        "stages": [
            {
                "name": "plove",
                "uses": "train_reward",
                "inputs": {"feedback": str(tmp_path / "logs.jsonl")},
                "with": {
                    "kind": "plove",
                    "split": "time",
                    "eval_fraction": 0.25,
                    "max_steps": 30,
                    "learning_rate": 3e-3,
                    "per_device_train_batch_size": 8,
                    "max_length": 64,
                    "full_finetune": True,
                    "plove": {"max_per_user": 12, "bins": 5},
                },
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    metrics = result.record("plove").metrics
    assert metrics["capped"] == 24 - 12  # the heavy user had 24 of the 72 training rows
    assert metrics["eval_examples"] == 24
    assert metrics["pos_weight"] > 1  # positives are the minority
    # the latest quarter is held out; an oracle that knows which replies are good scores:
    held = rows[72:]
    oracle = auroc([r["reaction"] == "love" for r in held], [float(r["reply"] in GOOD) for r in held])
    assert metrics["auroc"] > oracle - 0.05 and metrics["auroc"] > metrics["baseline_constant_auroc"] + 0.15
    folder = result.run_dir / "plove" / "reward_model"
    rm = load_reward_model(folder)
    out = rm.score(RewardBatch(["How do I do task 1?"] * 4, GOOD + BAD))
    assert out.scalar.shape == (4,) and ((out.scalar > 0) & (out.scalar < 1)).all()
    assert out.scalar[:2].min() > out.scalar[2:].max() + 0.2
    evaluation = json.loads((folder / "eval.json").read_text())
    assert (
        abs(
            metrics["ece"]
            - sum(b["count"] / 24 * abs(b["positive_rate"] - b["mean_prob"]) for b in evaluation["reliability"] if b["count"])
        )
        < 1e-9
    )
    assert sum(b["count"] for b in evaluation["buckets"]) == 24
    # the logit offset undoes the class weighting: mean P[Love] tracks the positive rate
    assert abs(metrics["mean_plove"] - metrics["eval_positive_rate"]) < 0.25
    from pipeline.report import build_report

    report = build_report(result.run_dir).read_text()
    assert "P[Love] reliability" in report and "<img" in report
    assert torch.isfinite(out.scalar).all()


def test_custom_positive_words_in_logs_label_examples_positive(tmp_path):
    """`positive: [thumbs_up]` on production logs: those replies are the positives (logs map
    the configured words to 'love' on reading, so labelling must count 'love' as positive)."""
    from feedback.sources import readers
    from reward_models.plove import examples_from_reactions

    rows = [
        {"prompt": f"q{i}", "reply": f"a{i}", "reaction": word}
        for i, word in enumerate(["thumbs_up", "thumbs_down", "thumbs_up", "meh"])
    ]
    write_jsonl(rows, tmp_path / "logs.jsonl")
    positive = ["thumbs_up"]
    examples = examples_from_reactions(readers.reactions(tmp_path / "logs.jsonl", positive), positive)
    assert [e.label for e in examples] == [1, 0, 1, 0]
