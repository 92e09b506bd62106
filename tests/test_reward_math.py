"""Reward-model maths without models: calibration, AUROC, P[Love]'s class-weight correction,
segmenters and span labels, combination (normalisation, dense bookkeeping, dominance guard)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reward_models.metrics import (
    auroc,
    classification_scores,
    expected_calibration_error,
    majority_baseline,
    pairwise_accuracy,
    quantile_buckets,
    reliability_bins,
)
from reward_models.plove import Example, cap_per_user, positive_weight
from reward_models.segments import segment_labels, split_sentences, split_subsentences

from .conftest import SHARED_DATA


def test_ece_by_hand():
    # bins of width 0.5: [0.1, 0.2, 0.4] -> mean 0.2333, observed 1/3; [0.6, 0.9] -> mean 0.75, observed 1/2
    probs = [0.1, 0.2, 0.4, 0.6, 0.9]
    labels = [0, 1, 0, 0, 1]
    expected = 3 / 5 * abs(1 / 3 - 0.7 / 3) + 2 / 5 * abs(0.5 - 0.75)
    assert expected_calibration_error(labels, probs, bins=2) == pytest.approx(expected)
    bins = reliability_bins(labels, probs, bins=2)
    assert [b["count"] for b in bins] == [3, 2]
    assert bins[1]["positive_rate"] == 0.5
    # perfectly calibrated constant predictor
    assert expected_calibration_error([1, 0, 0, 0], [0.25] * 4, bins=10) == pytest.approx(0.0)
    # probability 1.0 lands in the last bin
    assert reliability_bins([1], [1.0], bins=4)[-1]["count"] == 1


def test_auroc_matches_pair_counting_with_ties():
    labels = [1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.9, 0.5, 0.1, 0.3, 0.3]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    by_pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(labels, scores) == pytest.approx(by_pairs)
    assert auroc([1, 1, 0], [0.2, 0.3, 0.9]) == 0.0
    assert math.isnan(auroc([1, 1], [0.1, 0.2]))


def test_quantile_buckets_and_pairwise_accuracy():
    buckets = quantile_buckets([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], buckets=2)
    assert [b["positive_rate"] for b in buckets] == [0.0, 1.0]
    assert [b["count"] for b in buckets] == [2, 2]
    assert pairwise_accuracy([1, 2, 3], [0, 2, 4]) == pytest.approx((1 + 0.5) / 3)


def test_segment_scores_against_majority():
    scores = classification_scores([1, 0, 1, 1], [1, 0, 0, 1])
    assert scores["accuracy"] == 0.75
    assert scores["f1_error"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    base = majority_baseline([0, 0, 1], [1, 0, 1, 1])
    assert base["label"] == 0 and base["accuracy"] == 0.25 and base["f1_error"] == 0.0


def test_class_weight_offset_restores_calibration():
    """Weighted BCE's optimum for a constant logit is logit(p) + log(w); PLoveReward subtracts log(w)."""
    labels = [1] * 2 + [0] * 8
    w = positive_weight(labels, "balanced")
    assert w == 4.0
    z = torch.zeros((), requires_grad=True)
    y = torch.tensor(labels, dtype=torch.float32)
    optimizer = torch.optim.LBFGS([z], lr=1, max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z.expand(10), y, pos_weight=torch.tensor(w))
        loss.backward()
        return loss

    optimizer.step(closure)
    assert torch.sigmoid(z).item() == pytest.approx(0.5, abs=1e-4)  # weighted: looks balanced
    assert torch.sigmoid(z - math.log(w)).item() == pytest.approx(0.2, abs=1e-4)  # corrected: the true rate
    assert positive_weight(labels, "none") == 1.0


def test_cap_per_user_limits_heavy_users_only():
    examples = [Example("p", f"r{i}", i % 2, "heavy", "t") for i in range(10)] + [Example("p", "x", 1, "light", "t")]
    capped = cap_per_user(examples, 3, seed=0)
    assert sum(e.user == "heavy" for e in capped) == 3
    assert sum(e.user == "light" for e in capped) == 1
    assert cap_per_user(examples, 3, seed=0) == capped  # seeded
    assert cap_per_user(examples, None, seed=0) == examples


def test_segmenters():
    text = "Dr. Smith moved to the U.S. in 2001. He earned 3.5 million! Was it enough?"
    assert [text[s:e] for s, e in split_sentences(text)] == [
        "Dr. Smith moved to the U.S. in 2001.",
        "He earned 3.5 million!",
        "Was it enough?",
    ]
    long = "The title track, a song about queer desire, was released on 2 May as the third single."
    assert [long[s:e] for s, e in split_subsentences(long)] == [
        "The title track, a song about queer desire,",
        "was released on 2 May as the third single.",
    ]


def test_span_labels_follow_the_paper():
    text = "Paris is the capital. It has many old bridges and cafes. The Seine is long."
    sents = split_sentences(text)
    spans = [(22, 56, "irrelevant"), (57, 75, "unverifiable"), (0, 5, "irrelevant")]  # the last one is too short
    rel = segment_labels(text, sents, spans, {"irrelevant"}, set(), min_span_words=5, short_span_types={"irrelevant"})
    assert rel == [0, 1, 0]
    fact = segment_labels(text, sents, spans, {"unverifiable"}, {"irrelevant"}, min_span_words=5, short_span_types={"irrelevant"})
    assert fact == [0, None, 1]  # a sentence with only a non-factual error is ignored for factuality


@pytest.mark.skipif(not (SHARED_DATA / "qa_feedback" / "feedback_400.json").is_file(), reason="qa-feedback not available")
def test_qa_feedback_spans_become_segment_labels():
    from feedback.sources import readers
    from reward_models.fine_grained_data import segment_examples

    path = SHARED_DATA / "qa_feedback" / "feedback_400.json"
    records = readers.span_feedback(path)
    assert len(records) == 400
    first = records[0]
    relevance = segment_examples([first], "relevance", "subsentence", 5)[0]
    flagged = [first.response[s:e] for (s, e), label in zip(relevance.segments, relevance.labels) if label]
    # annotated Irrelevant spans in row 0 cover the album history and the last sentence
    assert any("debut studio album" in f for f in flagged)
    assert not relevance.labels[0]  # the opening clause answers the question
    prefs = readers.preferences(path)
    raw = json.loads(path.read_text())[0]
    assert sum(p != 0 for p in raw["preference"]) == sum(p.id.startswith("qa-0-") for p in prefs)


def test_conversational_preference_records_reach_reward_models_as_text(tmp_path):
    """The simulated users' preferences hold replies as TRL conversational completions (a list of
    one assistant message); FLR's pairwise scoring keyed replies by them and crashed (unhashable
    list). The readers hand reward models the reply's words, in both record and TRL formats."""
    from feedback.sources import readers
    from feedback.sources.formats import provenance

    prompt = [{"role": "user", "content": "Which blood type is the universal donor?"}]
    record = {
        "kind": "preference",
        "id": "us-029:0",
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "O negative."}],
        "rejected": [{"role": "assistant", "content": "AB positive."}],
        "provenance": provenance("convsim", "users", 0).model_dump(),
    }
    records = tmp_path / "prefs.jsonl"
    records.write_text(json.dumps(record) + "\n")
    trl = tmp_path / "trl.jsonl"
    trl.write_text(json.dumps({"prompt": prompt, "chosen": record["chosen"], "rejected": "AB positive."}) + "\n")
    for path in (records, trl):
        (pair,) = readers.preferences(path)
        assert (pair.chosen, pair.rejected, pair.prompt) == ("O negative.", "AB positive.", prompt), path
