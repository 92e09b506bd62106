"""Fine-grained dense rewards: each segment's +-w lands on the policy token that ends it, also
when the reward model's tokenizer (BERT word pieces) differs from the policy's (SmolLM2 BPE);
the holistic reward lands on the last token; the train_reward stage trains and evaluates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from reward_models.base import RewardBatch, load_reward_model, write_descriptor
from reward_models.common import resolve_base
from reward_models.segments import segment, token_char_ends

from .conftest import SHARED_DATA

TEXT = "Paris is the capital of France, and it is also its largest city. The Seine flows through it. Bread is tasty."
PROMPT = [
    {"role": "system", "content": "Paris is the capital of France."},
    {"role": "user", "content": "What is the capital of France?"},
]


def tiny_bert_rm(folder, tiny_llama=None):
    """A random 2-layer BERT token classifier + sequence RM on MiniLM's tokenizer, as a
    fine-grained reward model folder (no training: positions, not predictions, are tested)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertForTokenClassification

    minilm = resolve_base("minilm")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    BertForTokenClassification(config.__class__(**config.to_dict(), num_labels=2)).save_pretrained(folder / "relevance" / "model")
    BertForTokenClassification(config.__class__(**config.to_dict(), num_labels=2)).save_pretrained(
        folder / "factuality" / "model"
    )
    BertForSequenceClassification(config.__class__(**config.to_dict(), num_labels=1)).save_pretrained(
        folder / "completeness" / "model"
    )
    base = folder / "base"
    AutoTokenizer.from_pretrained(minilm).save_pretrained(base)
    shutil.copy(f"{minilm}/config.json", base / "config.json")
    aspects = {
        "relevance": {
            "type": "segments",
            "segmenter": "subsentence",
            "context": False,
            "weight": 0.3,
            "weights": "relevance/model",
        },
        "factuality": {
            "type": "segments",
            "segmenter": "sentence",
            "context": True,
            "weight": 0.5,
            "weights": "factuality/model",
        },
        "completeness": {
            "type": "holistic",
            "context": False,
            "weight": 0.3,
            "mean": 0.1,
            "std": 2.0,
            "weights": "completeness/model",
        },
    }
    write_descriptor(folder, "fine_grained", base_model=str(base), max_length=128, mark_token=None, aspects=aspects)
    return load_reward_model(folder)


@pytest.fixture(scope="module")
def policy_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def bert_rm(tmp_path_factory):
    return tiny_bert_rm(tmp_path_factory.mktemp("fg"))


def expected_end_token(tokenizer, ids, char_end):
    """The first policy token whose decoded prefix contains the segment's last character."""
    for i in range(len(ids)):
        if len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) >= char_end:
            return i
    raise AssertionError("segment end not reached")


def test_segment_rewards_land_on_policy_tokens_across_tokenizers(bert_rm, policy_tokenizer):
    ids = policy_tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [policy_tokenizer.eos_token_id]
    out = bert_rm.score(RewardBatch([PROMPT], [TEXT], [ids], policy_tokenizer))
    assert out.dense.shape == (1, len(ids))
    expected = torch.zeros(len(ids))
    for aspect in ("relevance", "factuality"):
        a = bert_rm.aspects[aspect]
        preds = bert_rm.segment_predictions(aspect, [PROMPT], [TEXT])[0]
        assert [(s, e) for s, e, _, _ in preds] == segment(TEXT, a.segmenter)  # every segment got a prediction
        for start, end, label, _ in preds:
            pos = expected_end_token(policy_tokenizer, ids, end)
            assert TEXT[start:end].endswith(policy_tokenizer.decode(ids[pos]).strip()[-1:])
            expected[pos] += -a.weight if label else a.weight
        assert out.components[aspect].item() == pytest.approx(sum(-a.weight if p[2] else a.weight for p in preds))
    raw = bert_rm.holistic("completeness", [PROMPT], [TEXT])
    expected[-1] += 0.3 * (raw[0] - 0.1) / 2.0  # holistic at the last token (here the EOS)
    assert torch.allclose(out.dense[0], expected, atol=1e-6)
    assert torch.allclose(out.scalar, out.dense.sum(1), atol=1e-5)


def test_non_canonical_policy_tokens_fall_back_to_decoding(bert_rm, policy_tokenizer):
    """One token per character (not what the tokenizer itself would produce): the segment's
    reward must sit on the token of its final character."""
    ids = [policy_tokenizer(ch, add_special_tokens=False)["input_ids"][0] for ch in TEXT]
    assert policy_tokenizer.decode(ids) == TEXT
    text, ends = token_char_ends(policy_tokenizer, ids)
    assert text == TEXT and ends == list(range(1, len(TEXT) + 1))
    out = bert_rm.with_weights({"completeness": 0.0}).score(RewardBatch([PROMPT], [TEXT], [ids], policy_tokenizer))
    bert_rm.with_weights({"completeness": 0.3})
    ends_of_segments = {e - 1 for a in ("relevance", "factuality") for _, e in segment(TEXT, bert_rm.aspects[a].segmenter)}
    assert set(torch.nonzero(out.dense[0]).flatten().tolist()) <= ends_of_segments
    assert out.dense[0, len(TEXT) - 1] != 0  # the last sentence ends on the final '.'


def test_batch_shapes_without_token_ids(bert_rm, policy_tokenizer):
    texts = [TEXT, "Short answer.", ""]
    out = bert_rm.score(RewardBatch([PROMPT, "q", "q"], texts, policy_tokenizer=policy_tokenizer))
    lengths = [len(policy_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert out.dense.shape == (3, max(lengths))
    assert (out.dense[1, lengths[1] :] == 0).all() and (out.dense[2] == 0).all()
    scalar_only = bert_rm.score(RewardBatch([PROMPT], [TEXT]))
    assert scalar_only.dense is None and scalar_only.scalar.shape == (1,)


@pytest.mark.skipif(not (SHARED_DATA / "qa_feedback" / "feedback_400.json").is_file(), reason="qa-feedback not available")
def test_train_reward_stage_fine_grained_on_tiny(tmp_path, tiny_model_path):
    """All three aspects train (2 steps each) on 40 qa-feedback rows; the folder loads, scores
    densely and carries per-aspect metrics next to their baselines."""
    from pipeline.config import pipeline_from_dict
    from pipeline.report import build_report
    from pipeline.runner import Runner

    rows = json.loads((SHARED_DATA / "qa_feedback" / "feedback_400.json").read_text())[:40]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    data = {
        "run_name": "fg",
        "model": "tiny",
        "stages": [
            {
                "name": "fg",
                "uses": "train_reward",
                "inputs": {"feedback": str(tmp_path / "qa.json")},
                "with": {
                    "kind": "fine_grained",
                    "max_steps": 2,
                    "per_device_train_batch_size": 4,
                    "max_length": 192,
                    "eval_fraction": 0.25,
                    "lora": {"r": 4, "alpha": 8},
                },
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    metrics = result.record("fg").metrics
    for key in (
        "relevance/accuracy",
        "relevance/baseline_accuracy",
        "factuality/f1_error",
        "completeness/pairwise_accuracy",
        "completeness/baseline_length_accuracy",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    folder = result.run_dir / "fg" / "reward_model"
    rm = load_reward_model(folder)
    assert sorted(rm.aspects) == ["completeness", "factuality", "relevance"]
    assert [rm.aspects[a].weight for a in ("relevance", "factuality", "completeness")] == [0.3, 0.5, 0.3]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    out = rm.score(RewardBatch([PROMPT], [TEXT], policy_tokenizer=tok))
    assert out.dense.shape[1] == len(tok(TEXT, add_special_tokens=False)["input_ids"])
    curves = json.loads((result.run_dir / "fg" / "curves.json").read_text())
    assert any("relevance/loss" in row for row in curves) and any("completeness/loss" in row for row in curves)
    report = build_report(result.run_dir).read_text()
    assert "reward model (fine_grained)" in report and "majority label" in report


def test_init_continues_each_aspect_and_refuses_another_form(tmp_path, tiny_model_path):
    """`init` (the loop's refresh): each aspect's token classifier starts from the init's adapter
    and head (at a learning rate of 1e-12 it stays the init's); an init trained as LoRA cannot
    continue as `full_finetune: true`."""
    from .test_reward_plove import same_weights, train_reward, trained_then_continued, weights

    rows = json.loads((SHARED_DATA / "qa_feedback" / "feedback_400.json").read_text())[:16]
    (tmp_path / "qa.json").write_text(json.dumps(rows))

    def train(name, init=None, learning_rate=3e-3, **extra):
        settings = {"kind": "fine_grained", "max_steps": 2, "learning_rate": learning_rate, "per_device_train_batch_size": 4}
        settings |= {"max_length": 128, "eval_fraction": 0.25, "lora": {"r": 4, "alpha": 8}, **extra}
        settings["fine_grained"] = {"aspects": ["relevance"]}
        return train_reward(tmp_path, name, tmp_path / "qa.json", settings, init)

    first_dir, again_dir = trained_then_continued(train)
    assert same_weights(weights(again_dir / "relevance"), weights(first_dir / "relevance"))
    full = train("full", init=first_dir, full_finetune=True)
    error = full.record("full").error or ""
    assert not full.ok and "(relevance): has a LoRA adapter, but full_finetune: true continues full weights" in error


def test_a_long_question_leaves_room_for_the_answer():
    """A prompt that carries its passages inline (span_views with_passages) is all question: the head
    is capped at half of max_length, so every segment of a short answer still gets its mark."""
    from transformers import AutoTokenizer

    from reward_models.fine_grained_data import encode_segments

    tokenizer = AutoTokenizer.from_pretrained(resolve_base("minilm"))
    segments = [(0, 30), (30, 64)]  # TEXT's first sentence, in two pieces
    mark = tokenizer.convert_tokens_to_ids("[SEP]")
    short, short_marks = encode_segments(tokenizer, "What is the capital?", TEXT, segments, mark, 128, False)
    long, long_marks = encode_segments(
        tokenizer, "What is the capital? " + "Passage words. " * 400, TEXT, segments, mark, 128, False
    )
    assert len(short_marks) == len(long_marks) == 2 and len(long) <= 128
    assert [long[m] for m in long_marks] == [mark, mark]
    assert long[long_marks[0] - 3 :] == short[short_marks[0] - 3 :]  # the answer's tokens are the same
