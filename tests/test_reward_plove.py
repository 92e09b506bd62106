"""P[Love] through the train_reward stage on the tiny model: learns a reaction cue, splits by
time, caps heavy users, loads back with load_reward_model, and reports calibration."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
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


def train_reward(tmp_path, name: str, feedback, settings: dict, init=None):
    """One train_reward stage `name` on the tiny model, in-process; `init`: a reward model to continue.
    (Shared by the init tests of every kind.)"""
    inputs = {"feedback": str(feedback), **({"init": str(init)} if init else {})}
    stage = {"name": name, "uses": "train_reward", "inputs": inputs, "with": settings}
    data = {"run_name": "init", "model": "tiny", "stages": [stage]}
    return Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()


def weights(folder) -> dict[str, torch.Tensor]:
    """The LoRA adapter (with the head PEFT saves beside it) in `folder`, or its full weights."""
    from safetensors.torch import load_file

    adapter = folder / "adapter" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else folder / "model" / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def trained_then_continued(train) -> tuple[Path, Path]:
    """`train(name, init=None, learning_rate=...)` twice: `first` as set, then `again` from it at a
    learning rate of 1e-12 (so a warm start ends where it began). Their reward model folders."""
    first = train("first")
    assert first.ok, [r.error for r in first.records]
    again = train("again", init=first.run_dir / "first" / "reward_model", learning_rate=1e-12)
    assert again.ok, [r.error for r in again.records]
    return first.run_dir / "first" / "reward_model", again.run_dir / "again" / "reward_model"


def _train_plove(tmp_path, name: str, init=None, learning_rate: float = 3e-3, full: bool = False):
    """A small P[Love] run on the production logs (LoRA, or every weight with `full`)."""
    if not (tmp_path / "logs.jsonl").exists():
        production_logs(tmp_path / "logs.jsonl", n=24)
    settings = {"kind": "plove", "max_steps": 3, "learning_rate": learning_rate, "max_length": 48, "full_finetune": full}
    settings["lora"] = {"r": 4, "alpha": 8}
    return train_reward(tmp_path, name, tmp_path / "logs.jsonl", settings, init)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full_finetune"])
def test_init_continues_the_given_plove_model(tmp_path, tiny_model_path, full):
    """With `init`, training starts from the init's adapter and head (or its full weights): at a
    learning rate of 1e-12 the result equals the init (a fresh start has a new random head)."""
    first_dir, again_dir = trained_then_continued(lambda *a, **k: _train_plove(tmp_path, *a, full=full, **k))
    fresh = _train_plove(tmp_path, "fresh", learning_rate=1e-12, full=full)
    trained = weights(first_dir)
    assert same_weights(weights(again_dir), trained)  # continued: the init's weights
    assert not same_weights(weights(fresh.run_dir / "fresh" / "reward_model"), trained)  # a fresh start is not
    assert json.loads((again_dir / "reward_model.json").read_text())["init"] == str(first_dir)


def test_init_of_another_kind_or_base_is_refused_with_a_clear_error(tmp_path, tiny_model_path):
    from pipeline.errors import HeedfulError
    from pipeline.paths import data_dir
    from reward_models.base import check_init
    from reward_models.followup import FollowupReward, Followups

    flr = tmp_path / "flr"
    FollowupReward.from_pretrained("tiny", Followups.load(data_dir() / "followups" / "flr_followups.json", per_aspect=1)).save(
        flr
    )
    result = _train_plove(tmp_path, "wrong", init=flr)
    error = result.record("wrong").error or ""
    assert not result.ok and "input 'init'" in error and "a 'followup' reward model cannot initialise a 'plove' one" in error
    assert not (result.run_dir / "wrong" / "reward_model").exists()  # nothing was trained
    with pytest.raises(HeedfulError, match="trained on base model 'tiny', this stage trains on '/no/such/model'"):
        check_init(flr, "followup", "/no/such/model")
    with pytest.raises(HeedfulError, match="not a reward model folder"):
        check_init(tmp_path, "plove", "tiny")


def test_held_out_prompts_keep_their_side_as_the_loop_grows_the_pool(tmp_path, tiny_model_path):
    """The loop refreshes P[Love] on a growing pool, continuing last round's model: a prompt held
    out in round 2 must not be one round 1 trained on (its AUROC/ECE would be on seen data), and
    every round-1 prompt keeps its side. A sorted-and-shuffled split reshuffled them all."""
    from feedback.sources import readers
    from pipeline.chat import last_user_text
    from reward_models.common import split_train_eval
    from reward_models.plove import examples_from_reactions

    def split(path: Path) -> tuple[set[str], set[str]]:
        """The prompts train_reward trains on and holds out (its defaults: group by prompt, 0.2, seed 0)."""
        examples = examples_from_reactions(readers.reactions(path, ["love"]), ["love"])
        train, held = split_train_eval(examples, 0.2, 0, "group", group=lambda e: last_user_text(e.prompt))
        return {last_user_text(e.prompt) for e in train}, {last_user_text(e.prompt) for e in held}

    rounds = [tmp_path / f"pool{n}.jsonl" for n in (24, 48, 96)]
    for path, n in zip(rounds, (24, 48, 96)):
        production_logs(path, n=n)  # the same first rows, then more: the loop's pool grows
    sides = [split(path) for path in rounds]
    for (train_before, held_before), (train_now, held_now) in zip(sides, sides[1:]):
        assert held_now and not held_now & train_before  # held out now: never trained on before
        assert train_before <= train_now and held_before <= held_now  # each prompt keeps its side
    assert 0.1 < len(sides[-1][1]) / 96 < 0.3  # about eval_fraction of the prompts

    # the stage holds out exactly these: round 2 continues round 1's model, evaluated on round 2's held-out prompts
    settings = {"kind": "plove", "max_steps": 2, "max_length": 48, "lora": {"r": 4, "alpha": 8}}
    first = train_reward(tmp_path, "round1", rounds[0], settings)
    assert first.ok, [r.error for r in first.records]
    again = train_reward(tmp_path, "round2", rounds[1], settings, init=first.run_dir / "round1" / "reward_model")
    assert again.ok, [r.error for r in again.records]
    metrics = again.record("round2").metrics
    assert metrics["eval_examples"] == len(sides[1][1]) and metrics["train_examples"] == len(sides[1][0])
