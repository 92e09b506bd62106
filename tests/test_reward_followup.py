"""FLR on the tiny model: one packed pass equals one pass per follow-up (1e-4), the reward is
mean positive minus mean negative log-likelihood, the follow-up lists load with clear errors,
and the train_reward stage evaluates and fine-tunes on qa-feedback preferences."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.chat import last_user_text
from pipeline.errors import DataError
from pipeline.paths import data_dir
from reward_models.base import RewardBatch
from reward_models.followup import FollowupReward, Followups, naive_logprobs, pack_followups, packed_logprobs

from .conftest import SHARED_DATA

PROMPTS = [
    "What is the capital of France?",
    [{"role": "system", "content": "Passages: Paris is in France."}, {"role": "user", "content": "Tell me a cat joke."}],
    "hi",
]
REPLIES = [
    "Paris is the capital of France.",
    "Why did the cat sit on the computer? To watch the mouse!",
    "Hello! How can I help you today? Ask me anything at all.",
]


@pytest.fixture(scope="module")
def flr(tiny_model_path):
    followups = Followups.load(data_dir() / "followups" / "flr_followups.json", per_aspect=2)
    return FollowupReward.from_pretrained("tiny", followups, batch_size=3, include_context=True)


def test_packed_pass_equals_one_pass_per_followup(flr):
    packed = flr.logprobs(PROMPTS, REPLIES)
    naive = flr.logprobs(PROMPTS, REPLIES, naive=True)
    assert packed.shape == (3, len(flr.followups.texts)) == (3, 24)
    assert (packed - naive).abs().max().item() < 1e-4
    assert (packed < 0).all()
    # batching replies of different prefix lengths must not change a reply's scores
    alone = flr.logprobs(PROMPTS[:1], REPLIES[:1])
    assert torch.allclose(alone[0], packed[0], atol=1e-4)


def test_batched_naive_baseline_agrees(flr):
    prefixes = [flr.prefix_ids(p, r) for p, r in zip(PROMPTS, REPLIES)]
    a = naive_logprobs(flr.model, prefixes, flr.followup_ids, flr.pad_id, batch_followups=True)
    b = packed_logprobs(flr.model, prefixes, flr.followup_ids, flr.pad_id)
    assert (a - b).abs().max().item() < 1e-4


def test_tokens_match_the_full_conversation(flr):
    """Prefix ids + follow-up ids == tokenising the whole conversation with the follow-up turn."""
    tok = flr.tokenizer
    for prompt, reply in zip(PROMPTS, REPLIES):
        messages = flr.format.messages(prompt, reply)
        for text, ids in zip(flr.followups.texts, flr.followup_ids):
            full = tok.apply_chat_template(messages + [{"role": "user", "content": text}], tokenize=False)
            full_ids = tok(full, add_special_tokens=False)["input_ids"]
            joined = flr.prefix_ids(prompt, reply) + ids
            assert full_ids[: len(joined)] == joined
            assert tok.decode(full_ids[len(joined) :]).strip() == ""  # only the template's trailing newline is left


def test_mask_isolates_followups():
    packed = pack_followups([[5, 6, 7], [8]], [[1, 2], [3]], pad_id=0)
    mask = packed["attention_mask"][:, 0] == 0  # True = may attend
    # row 1: [pad pad 8 | 1 2 | 3]; the second follow-up (col 5) sees the prefix (col 2) and itself only
    assert mask[1, 5].tolist() == [False, False, True, False, False, True]
    assert packed["position_ids"][1].tolist() == [0, 0, 0, 1, 2, 1]
    assert packed["keep"].tolist() == [2, 3, 2]  # first tokens are predicted from the prefix end


def test_reward_is_positive_minus_negative_mean(flr):
    lp = flr.logprobs(PROMPTS, REPLIES)
    pos = torch.tensor(flr.followups.positive)
    out = flr.score(RewardBatch(PROMPTS, REPLIES))
    assert torch.allclose(out.scalar, lp[:, pos].mean(1) - lp[:, ~pos].mean(1), atol=1e-5)
    assert out.dense is None
    assert set(out.components) == {f"flr/{a}" for a in flr.followups.aspects}


def test_save_and_load(flr, tmp_path):
    from reward_models.base import load_reward_model

    flr.save(tmp_path / "rm")
    again = load_reward_model(tmp_path / "rm")
    assert again.followups.texts == flr.followups.texts
    assert torch.allclose(
        again.score(RewardBatch(PROMPTS, REPLIES)).scalar, flr.score(RewardBatch(PROMPTS, REPLIES)).scalar, atol=1e-5
    )


def test_followup_list_errors(tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text(json.dumps({"aspects": {"relevance": {"positive": ["ok"], "negative": "nope"}}}))
    with pytest.raises(DataError, match="aspects.relevance.negative"):
        Followups.load(bad)
    with pytest.raises(DataError, match="aspects.humour is missing"):
        Followups.load(data_dir() / "followups" / "flr_followups.json", aspects=["humour"])


@pytest.mark.slow
def test_smollm2_flr_prefers_answers_to_evasions(smollm2_path):
    """With the real SmolLM2-135M, an on-topic answer makes positive follow-ups likelier than
    an evasive or off-topic reply does (rewards move the right way)."""
    followups = Followups.load(data_dir() / "followups" / "flr_followups.json", per_aspect=2)
    rm = FollowupReward.from_pretrained("smollm2-135m", followups, batch_size=6)
    prompts = ["What is the capital of France?", "How many legs does a spider have?", "What color is the sky on a clear day?"]
    good = ["The capital of France is Paris.", "A spider has eight legs.", "On a clear day the sky is blue."]
    bad = ["I don't want to talk about that.", "Bananas are a good source of potassium.", "Figure it out yourself."]
    scores = rm.score(RewardBatch(prompts * 2, good + bad)).scalar
    assert (scores[:3] > scores[3:]).all(), scores


@pytest.mark.skipif(not (SHARED_DATA / "qa_feedback" / "feedback_400.json").is_file(), reason="qa-feedback not available")
def test_train_reward_stage_flr_finetunes_on_feedback(tmp_path, tiny_model_path):
    """train_reward kind=followup on 30 qa-feedback rows: zero-shot and fine-tuned pairwise
    accuracy on held-out prompts next to the length baseline (recomputed here by hand), and
    fine-tuning on the follow-up turn makes the follow-ups likelier after training replies."""
    from feedback.sources import readers
    from pipeline.config import pipeline_from_dict
    from pipeline.runner import Runner
    from reward_models.base import load_reward_model
    from reward_models.metrics import pairwise_accuracy

    rows = json.loads((SHARED_DATA / "qa_feedback" / "feedback_400.json").read_text())[:30]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    data = {
        "run_name": "flr",
        "model": "tiny",
        "stages": [
            {
                "name": "flr",
                "uses": "train_reward",
                "inputs": {"feedback": str(tmp_path / "qa.json")},
                "with": {
                    "kind": "followup",
                    "max_steps": 12,
                    "learning_rate": 3e-3,
                    "per_device_train_batch_size": 8,
                    "max_length": 128,
                    "eval_fraction": 0.2,
                    "lora": {"r": 8, "alpha": 16},
                    "followup": {"per_aspect": 1, "max_eval_prompts": 10, "finetune": True},
                },
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    metrics = result.record("flr").metrics
    assert metrics["followups"] == 12 and metrics["finetune_examples"] > 0
    assert "only the follow-up tokens through the LM head" in (result.run_dir / "logs" / "flr.log").read_text()
    folder = result.run_dir / "flr" / "reward_model"
    evaluation = json.loads((folder / "eval.json").read_text())
    assert [row["what"] for row in evaluation["comparison"]] == ["FLR zero-shot", "FLR fine-tuned"]
    # the held-out pairs are the prompts the stage did not train on; the length baseline by hand
    pairs = readers.preferences(tmp_path / "qa.json")
    train_prompts = {last_user_text(p) for p, _, _ in _train_triples(pairs)}
    held = [p for p in pairs if last_user_text(p.prompt) not in train_prompts]
    assert len(held) == metrics["eval_pairs"]
    assert metrics["baseline_length_accuracy"] == pytest.approx(
        pairwise_accuracy([len(p.chosen) for p in held], [len(p.rejected) for p in held])
    )
    for key in ("pairwise_accuracy_zero_shot", "pairwise_accuracy_finetuned"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["pairwise_accuracy"] == metrics["pairwise_accuracy_finetuned"]
    # fine-tuned: the adapter loads with the folder, and follow-ups got likelier after training replies
    tuned = load_reward_model(folder)
    assert tuned.adapter is not None
    zero = FollowupReward.from_pretrained("tiny", tuned.followups)
    train_pairs = [p for p in pairs if last_user_text(p.prompt) in train_prompts][:4]
    prompts, replies = [p.prompt for p in train_pairs], [p.chosen for p in train_pairs]
    # (12 LoRA steps on the random tiny model: +0.25 nats/token measured here)
    assert tuned.logprobs(prompts, replies).mean() > zero.logprobs(prompts, replies).mean() + 0.1


def test_train_reward_stage_flr_scores_conversational_preferences(tmp_path, tiny_model_path):
    """The simulated users' preferences are conversational (each reply a list of one assistant
    message), as the arena's users source hands them to PPO's FLR; the stage scored them by a
    list key and crashed. Zero-shot here: pairwise accuracy on the held-out pairs, and the
    length baseline by hand on the held-out pairs' words."""
    from feedback.sources import readers
    from feedback.sources.formats import provenance
    from pipeline.config import pipeline_from_dict
    from pipeline.runner import Runner
    from reward_models.common import split_train_eval
    from reward_models.metrics import pairwise_accuracy

    # every chosen reply is the longer one: the length baseline is 1.0 on the words, while a list
    # reply's len is 1 on both sides (a tie, 0.5)
    replies = [("O negative, the universal donor.", "AB."), ("Mercury, the closest planet.", "Venus.")]
    replies += [("Paris, the capital.", "Lyon."), ("Seven continents.", "Six.")]
    rows = [
        {
            "kind": "preference",
            "id": f"need-{i}:0",
            "prompt": [{"role": "user", "content": f"question {i}?"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "provenance": provenance("convsim", "users", i).model_dump(),
        }
        for i, (chosen, rejected) in enumerate(replies)
    ]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {
        "run_name": "flr_users",
        "model": "tiny",
        "stages": [
            {
                "name": "flr",
                "uses": "train_reward",
                "inputs": {"feedback": str(tmp_path / "prefs.jsonl")},
                "with": {"kind": "followup", "eval_fraction": 0.5, "followup": {"per_aspect": 1, "finetune": False}},
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    metrics = result.record("flr").metrics
    assert metrics["eval_pairs"] == 2 and 0.0 <= metrics["pairwise_accuracy_zero_shot"] <= 1.0
    # the length baseline on the held-out pairs' words (a list reply's len would be 1: a tie)
    _, held = split_train_eval(
        readers.preferences(tmp_path / "prefs.jsonl"), 0.5, 0, "group", group=lambda p: last_user_text(p.prompt)
    )
    words = dict(replies)
    expected = pairwise_accuracy([len(p.chosen) for p in held], [len(p.rejected) for p in held])
    assert all(words[p.chosen] == p.rejected for p in held) and expected == 1.0
    assert metrics["baseline_length_accuracy"] == pytest.approx(expected)
    evaluation = json.loads((result.run_dir / "flr" / "reward_model" / "eval.json").read_text())
    assert evaluation["comparison"][0]["what"] == "FLR zero-shot"


def _train_triples(pairs):
    """The prompts train_reward keeps for training (same split as the stage: group by prompt, seed 0)."""
    from reward_models.common import split_train_eval

    train, _ = split_train_eval(pairs, 0.2, 0, "group", group=lambda p: last_user_text(p.prompt))
    return [(p.prompt, p.chosen, None) for p in train]


def test_finetune_rows_keep_the_follow_up_and_the_conversations_end(tiny_model_path):
    """A conversation longer than max_length keeps its last tokens (next to the reply), never the
    follow-up's: cut on the right, TRL would drop the row and a run of long rows failed obscurely."""
    from pipeline.errors import HeedfulError
    from pipeline.models import load_tokenizer
    from reward_models.followup import fit_rows

    tokenizer = load_tokenizer("tiny")
    long = "Passage: " + "the river runs to the sea " * 40 + "Question: where? Answer: to the sea."
    rows = fit_rows([(long, "Thanks!"), ("hi", "Thanks!")], tokenizer, 32)
    assert [r["completion"] for r in rows] == ["Thanks!", "Thanks!"] and rows[1]["prompt"] == "hi"
    kept = rows[0]["prompt"]
    assert long.endswith(kept) and len(kept) < len(long) / 4
    tokens = len(tokenizer(kept, add_special_tokens=False)["input_ids"]) + len(
        tokenizer("Thanks!", add_special_tokens=False)["input_ids"]
    )
    assert tokens <= 32  # re-tokenised at the cut, and still within max_length
    with pytest.raises(HeedfulError, match="max_length=2"):
        fit_rows([(long, "Thanks a lot, that was useful!")], tokenizer, 2)


def test_evaluation_reload_honours_use_gpu_false(tmp_path, tiny_model_path, monkeypatch):
    """`use_gpu: false` keeps the held-out evaluation on the CPU even where a GPU is visible:
    the reloaded reward model follows the stage's device policy, not the bare `device` field
    (which, unset, meant "cuda when available"). A visible GPU is simulated on this CPU-only
    machine: any attempt to place a model on it fails."""
    import torch

    from pipeline.config import pipeline_from_dict
    from pipeline.runner import Runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    from pipeline.records import write_jsonl

    write_jsonl(
        [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."} for i in range(10)],
        tmp_path / "prefs.jsonl",
    )
    data = {
        "run_name": "flr-cpu",
        "model": "tiny",
        "stages": [
            {
                "name": "flr",
                "uses": "train_reward",
                "inputs": {"feedback": str(tmp_path / "prefs.jsonl")},
                "with": {
                    "kind": "followup",
                    "use_gpu": False,
                    "eval_fraction": 0.2,
                    "followup": {"per_aspect": 1, "max_eval_prompts": 3},
                },
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    assert 0.0 <= result.record("flr").metrics["pairwise_accuracy_zero_shot"] <= 1.0


def test_init_continues_a_finetuned_flr_model(tmp_path, tiny_model_path):
    """`init` (the loop's refresh): fine-tuning starts from the init's adapter, so at a learning rate
    of 1e-12 the result equals it; a fine-tuned init with `finetune: false` is refused (it would
    drop what the init learned)."""
    from .test_reward_plove import same_weights, train_reward, trained_then_continued, weights

    rows = json.loads((SHARED_DATA / "qa_feedback" / "feedback_400.json").read_text())[:12]
    (tmp_path / "qa.json").write_text(json.dumps(rows))

    def train(name, init=None, learning_rate=3e-3, finetune=True):
        settings = {"kind": "followup", "max_steps": 2, "learning_rate": learning_rate, "per_device_train_batch_size": 4}
        settings |= {"max_length": 96, "lora": {"r": 4, "alpha": 8}}
        settings["followup"] = {"per_aspect": 1, "max_eval_prompts": 1, "finetune": finetune}
        return train_reward(tmp_path, name, tmp_path / "qa.json", settings, init)

    first_dir, again_dir = trained_then_continued(train)
    assert same_weights(weights(again_dir), weights(first_dir))
    assert any(v.abs().sum() > 0 for k, v in weights(first_dir).items() if "lora_B" in k)  # a fresh LoRA B would be zero
    dropped = train("dropped", init=first_dir, finetune=False)
    assert not dropped.ok and "followup.finetune: false would drop" in (dropped.record("dropped").error or "")


def test_flr_fast_switch_does_not_change_the_fingerprint():
    """`followup.fast` is how the FLR fine-tune computes its loss (the same numbers to rounding), so a
    finished run is not redone when it flips; `finetune` is what it computes, and is."""
    from pipeline import registry
    from pipeline.fingerprint import semantic_config

    stage = registry.get("train_reward")
    assert stage is not None

    def fingerprinted(**followup):
        return semantic_config(stage.Config(kind="followup", followup=followup), exclude=stage.non_semantic_fields)

    assert fingerprinted(finetune=True, fast=False) == fingerprinted(finetune=True)
    assert fingerprinted(finetune=True) != fingerprinted(finetune=False)
