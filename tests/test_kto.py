"""KTO on the tiny model from binary feedback: the loss falls, and desirable replies gain
log-probability relative to undesirable ones (measured with a forward pass, base vs adapter).
The readers turn reactions, labelled rows and judgments into TRL's unpaired rows."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import pipeline_from_dict
from pipeline.errors import DataError
from pipeline.records import write_jsonl
from pipeline.runner import Runner
from trainers.kto import trl_format, unpaired_rows

from .test_dpo import CAPITALS  # the same toy facts DPO learns from, here as binary feedback

GOOD, BAD = "The capital of {country} is {city}.", "Banana banana banana banana."


def reactions(path):
    """Reaction records as simulate / serving export write them: love the right answer,
    dislike the nonsense, and a neutral one that KTO leaves out."""
    rows = []
    for i, (country, city) in enumerate(CAPITALS):
        prompt = [{"role": "user", "content": f"What is the capital of {country}?"}]
        rows.append(
            {
                "id": f"g{i}",
                "kind": "reaction",
                "prompt": prompt,
                "response": GOOD.format(country=country, city=city),
                "reaction": "love",
                "provenance": {"source": "convsim"},
            }
        )
        rows.append(
            {
                "id": f"b{i}",
                "kind": "reaction",
                "prompt": prompt,
                "response": BAD,
                "reaction": "dislike",
                "provenance": {"source": "convsim"},
            }
        )
    rows.append(
        {
            "id": "n",
            "kind": "reaction",
            "prompt": "Hi?",
            "response": "Hello.",
            "reaction": "neutral",
            "provenance": {"source": "convsim"},
        }
    )
    write_jsonl(rows, path)
    return path


def test_readers_map_every_binary_shape():
    rows = unpaired_rows(
        [
            {"prompt": "a", "response": "x", "reaction": "love"},
            {"prompt": "a", "response": "y", "reaction": "thumbs_down"},
            {"prompt": "a", "response": "z", "reaction": "neutral"},
            {"prompt": "b", "completion": "w", "label": "undesirable"},
            {"prompt": "b", "completion": "v", "label": True},
            {"id": "c", "prompt": "c", "response": "u", "critique": "Nice.", "judgment": "good"},
            {"id": "d", "prompt": "d", "response": "t", "critique": "Too long.", "judgment": "needs_work"},
            {"instruction": "e", "response": "s", "judgment": "Wrong.", "positive": False},
        ],
        "fb.jsonl",
    )
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("a", "x", True),
        ("a", "y", False),
        ("b", "w", False),
        ("b", "v", True),
        ("c", "u", True),
        ("d", "t", False),
        ("e", "s", False),
    ]
    chat = trl_format(rows[:1], conversational=True)[0]
    assert chat == {
        "prompt": [{"role": "user", "content": "a"}],
        "completion": [{"role": "assistant", "content": "x"}],
        "label": True,
    }
    assert (
        trl_format([{"prompt": [{"role": "user", "content": "q"}], "completion": "r", "label": False}], False)[0]["prompt"] == "q"
    )


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "a", "response": "x", "reaction": "meh"}, "fb.jsonl row 0: field 'reaction': 'meh'"),
        ({"prompt": "a", "completion": "x", "label": "maybe"}, "fb.jsonl row 0: field 'label'"),
        ({"response": "x", "reaction": "love"}, "fb.jsonl row 0: field 'prompt' is missing"),
        ({"prompt": "a", "response": "x", "critique": "c", "judgment": "great"}, "fb.jsonl row 0: field 'judgment'"),
    ],
)
def test_readers_name_the_bad_field(row, message):
    with pytest.raises(DataError, match=message):
        unpaired_rows([row], "fb.jsonl")


def test_config_needs_a_batch_of_two(tmp_path):
    from pipeline.errors import ConfigError

    spec = {
        "run_name": "k",
        "model": "tiny",
        "stages": [
            {
                "name": "align",
                "uses": "kto",
                "inputs": {"feedback": str(tmp_path / "r.jsonl")},
                "with": {"per_device_train_batch_size": 1},
            }
        ],
    }
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        pipeline_from_dict(spec, tmp_path)


def test_simulate_reactions_wire_to_kto(tmp_path):
    write_jsonl([{"need": "a recipe", "prompt": "Any dinner ideas?"}], tmp_path / "needs.jsonl")
    spec = {
        "run_name": "k",
        "model": "tiny",
        "stages": [
            {"name": "users", "uses": "simulate", "inputs": {"conversations": str(tmp_path / "needs.jsonl")}},
            {"name": "align", "uses": "kto", "inputs": {"feedback": "users.reactions"}},
        ],
    }
    pipeline = pipeline_from_dict(spec, tmp_path)
    assert pipeline.stage("align").inputs["feedback"].stage == "users"


def kto_pipeline(feedback, **settings) -> dict:
    """One kto stage on `tiny` over `feedback`, 4 rows a step at a high learning rate; `settings` added."""
    settings = {"max_steps": 12, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "max_length": 64, **settings}
    return {
        "run_name": "kto-toy",
        "model": "tiny",
        "stages": [{"name": "align", "uses": "kto", "inputs": {"feedback": str(feedback)}, "with": settings}],
    }


def test_kto_loss_falls_and_desirable_replies_gain(tmp_path, tiny_model_path):
    feedback = reactions(tmp_path / "reactions.jsonl")
    spec = kto_pipeline(feedback, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    result = Runner(pipeline_from_dict(spec, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    metrics = json.loads((result.run_dir / "align" / "manifest.json").read_text()).get("metrics", {})
    assert metrics.get("desirable") == len(CAPITALS) and metrics.get("undesirable") == len(CAPITALS)  # neutral left out
    curves = json.loads((result.run_dir / "align" / "curves.json").read_text())
    losses = [row["loss"] for row in curves if "loss" in row]
    assert len(losses) == 12
    assert abs(losses[0] - 0.5) < 0.01  # policy == reference (base, adapter off) at step 0: 1 - sigmoid(0)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05

    from peft import PeftModel

    from pipeline.chat import as_messages, assistant
    from pipeline.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("tiny")

    def reply_logp(model, country, reply):
        prompt = tok.apply_chat_template(
            as_messages(f"What is the capital of {country}?"), tokenize=False, add_generation_prompt=True
        )
        full = tok.apply_chat_template(as_messages(f"What is the capital of {country}?") + assistant(reply), tokenize=False)
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        return logps[n - 1 :].sum().item()

    def gap(model):  # mean log p(desirable) - log p(undesirable) over the prompts
        return sum(reply_logp(model, c, GOOD.format(country=c, city=y)) - reply_logp(model, c, BAD) for c, y in CAPITALS) / len(
            CAPITALS
        )

    base = load_causal_lm("tiny").eval()
    before = gap(base)
    tuned = PeftModel.from_pretrained(base, str(result.run_dir / "align" / "adapter")).eval()
    after = gap(tuned)
    assert after > before + 1.0, (before, after)


def test_feedback_with_one_kind_of_signal_is_refused(tmp_path):
    import logging

    from trainers.kto import read_feedback

    write_jsonl(
        [{"prompt": "a", "response": "x", "reaction": "love"}, {"prompt": "b", "response": "y", "reaction": "neutral"}],
        tmp_path / "r.jsonl",
    )
    with pytest.raises(DataError, match=r"r.jsonl: KTO needs desirable and undesirable replies, got 1 of 1 desirable"):
        read_feedback(tmp_path / "r.jsonl", logging.getLogger("t"))


def test_class_weights_balanced_by_the_papers_rule():
    """desirable_weight * n_D == undesirable_weight * n_U, by raising the rarer class; hand-set weights stay."""
    from trainers.kto_config import KTOMethodConfig

    cfg = KTOMethodConfig()
    assert (cfg.balanced(8, 12).desirable_weight, cfg.balanced(8, 12).undesirable_weight) == (1.5, 1.0)
    assert (cfg.balanced(120, 40).desirable_weight, cfg.balanced(120, 40).undesirable_weight) == (1.0, 3.0)
    assert cfg.balanced(10, 10) == cfg
    assert KTOMethodConfig(desirable_weight=2.0).balanced(8, 12).desirable_weight == 2.0  # set by hand: kept
    assert KTOMethodConfig(balance_classes=False).balanced(8, 12).desirable_weight == 1.0
    for d, u in [(8, 12), (120, 40), (7, 1)]:
        b = cfg.balanced(d, u)
        assert b.desirable_weight * d == pytest.approx(b.undesirable_weight * u)


def test_reference_precomputed_where_the_run_reads_every_row():
    """TRL's step (`fast: false`): on for a run that reads each row at least twice (one worker, no
    QLoRA), off for one epoch or a few steps over many rows; set by hand, or through TRL's own key in
    trainer_args, it is kept. The packed core (`fast: true`) decides its cache itself: left unset."""
    from stages.kto import KtoStageConfig

    def decided(rows: int, **settings) -> KtoStageConfig:
        return KtoStageConfig(**{"fast": False, **settings}).reference_once(rows)

    assert decided(100, num_train_epochs=3, fast=True).precompute_ref_log_probs is None
    assert decided(100, num_train_epochs=3, fast=True).trl_kwargs()["precompute_ref_log_probs"] is False
    assert decided(100, fast=True, precompute_ref_log_probs=True).precompute_ref_log_probs is True  # by hand: kept

    assert decided(100).precompute_ref_log_probs is False  # one epoch (the default): no gain to pay for the hash
    assert decided(100, num_train_epochs=2).precompute_ref_log_probs is True
    assert decided(100, max_steps=2, per_device_train_batch_size=4).precompute_ref_log_probs is False  # 8 of 100 rows
    assert decided(4, max_steps=2, per_device_train_batch_size=4).precompute_ref_log_probs is True
    assert decided(8, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2).precompute_ref_log_probs
    assert decided(100, num_train_epochs=3, lora={"qlora": True}).precompute_ref_log_probs is False
    assert decided(100, num_train_epochs=3, num_workers=2).precompute_ref_log_probs is False
    with pytest.raises(ValueError, match="needs num_workers: 1"):
        KtoStageConfig(num_workers=2, precompute_ref_log_probs=True)
    assert decided(100, precompute_ref_log_probs=False).precompute_ref_log_probs is False
    by_trl_key = decided(100, max_steps=1, trainer_args={"precompute_ref_log_probs": True, "seed": 3})
    assert by_trl_key.precompute_ref_log_probs is True and by_trl_key.trainer_args == {"seed": 3}
    assert by_trl_key.trl_kwargs()["precompute_ref_log_probs"] is True


def test_fast_core_and_trls_step_with_or_without_precompute_train_the_same_steps(tmp_path, tiny_model_path, monkeypatch):
    """The stage's four ways to the same KTO: the packed core with its reference cached (a run that
    reads every row: 4 steps x 4 of 16 rows) or inside each step (3 steps read 12 of 16 rows: the
    cache would cost more than the steps' reference), TRL's step with the reference inside every
    step, and TRL's with it precomputed. The same losses (1e-5), the stage log says which ran, and
    the settings are how, not what (a finished stage is not rerun for them)."""
    from pipeline.runner import fingerprints

    from .conftest import isolated_home

    monkeypatch.setenv("HEEDFUL_HOME", str(isolated_home(tmp_path / "home")))  # an empty reference cache
    feedback = reactions(tmp_path / "reactions.jsonl")
    ways = {
        "fast": ({}, "packed KTO core; reference log-probs of every row computed in"),
        "fast-few-steps": ({"max_steps": 3}, "packed KTO core; reference log-probs inside each step"),
        "trl": ({"fast": False, "precompute_ref_log_probs": False}, None),
        "trl-precompute": ({"fast": False, "precompute_ref_log_probs": True}, "reference log-probs computed once, before"),
    }
    said = {line for _, line in ways.values() if line}
    losses, prints, metrics = {}, {}, {}
    for way, (settings, line) in ways.items():
        settings = {"max_steps": 4, "lr_scheduler_type": "constant", **settings}  # constant: 3 steps are 4's first 3
        spec = kto_pipeline(feedback, lora={"r": 4, "alpha": 8, "dropout": 0.0}, **settings)
        pipeline = pipeline_from_dict(spec, tmp_path)
        prints[way] = fingerprints(pipeline)["align"]
        result = Runner(pipeline, tmp_path / f"runs-{way}", use_ray=False).execute()
        assert result.ok, [r.error for r in result.records]
        log = (result.run_dir / "align" / "stage.log").read_text()
        assert [s for s in said if s in log] == ([line] if line else []), way
        assert ("KTO's mismatched KL replies" in log) == way.startswith("fast")  # apart or in the row: the log says which
        curves = json.loads((result.run_dir / "align" / "curves.json").read_text())
        losses[way] = [row["loss"] for row in curves if "loss" in row]
        metrics[way] = json.loads((result.run_dir / "align" / "manifest.json").read_text())["metrics"]
    assert len(losses["fast"]) == 4 and len(losses["fast-few-steps"]) == 3
    assert losses["fast-few-steps"] == pytest.approx(losses["fast"][:3], abs=1e-5)
    for way in ("trl", "trl-precompute"):
        assert losses[way] == pytest.approx(losses["fast"], abs=1e-5), way
        assert prints[way] == prints["fast"]
    assert losses["fast"][-1] != pytest.approx(losses["fast"][0], abs=1e-4)  # it trained: the comparison is not of constants
    assert metrics["fast"]["reference_seconds"] > 0 and "reference_seconds" not in metrics["fast-few-steps"]
