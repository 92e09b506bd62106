"""Rewards for PPO: rule reward models on the real SmolLM2 tokenizer (dense rewards on the
tokens that earn them) and the multi-objective combination the trainer optimises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reward_models.base import RewardBatch, Rewards, load_reward_model
from reward_models.rules import PromptOverlapReward, TokenClassReward, build_rule, token_char_ends
from trainers.ppo.objectives import Objective, score_objectives


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from pipeline.models import load_tokenizer

    return load_tokenizer(str(tiny_model_path))


def batch_of(tokenizer, prompts, responses):
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    return RewardBatch(prompts=prompts, responses=responses, response_token_ids=ids, policy_tokenizer=tokenizer), ids


def test_token_class_rewards_exactly_the_matching_tokens(tokenizer):
    batch, ids = batch_of(tokenizer, ["q"], ["I have 3 cats and 12 dogs"])
    rewards = TokenClassReward(pattern=r"\d", value=1.0, penalty=0.25).score(batch)
    digits = [any(c.isdigit() for c in tokenizer.decode([t])) for t in ids[0]]
    assert sum(digits) >= 2
    expected = torch.tensor([1.0 if d else -0.25 for d in digits])
    assert torch.equal(rewards.dense[0, : len(ids[0])], expected)
    assert rewards.scalar.item() == pytest.approx(float(expected.sum()))


def test_prompt_overlap_rewards_first_mentions_at_the_completing_token_and_penalises_repeats(tokenizer):
    prompt = [{"role": "user", "content": "Why is the sky blue during the daytime?"}]
    response = "The sky looks blue because light scatters. The sky looks blue because"
    batch, ids = batch_of(tokenizer, [prompt], [response])
    rule = PromptOverlapReward(value=1.0, repeat_penalty=0.5)
    assert rule.content_words(prompt) == {"sky", "blue", "during", "daytime"}
    rewards = rule.score(batch)
    dense = rewards.dense[0, : len(ids[0])]
    # "sky" and "blue" mentioned (+1 each, once); 3 repeated trigrams (the sky looks / sky looks blue / looks blue because)
    assert rewards.scalar.item() == pytest.approx(2.0 - 3 * 0.5)
    text, ends = token_char_ends(tokenizer, ids[0])
    sky_token = next(k for k, end in enumerate(ends) if end >= text.index("sky") + 3)
    assert dense[sky_token].item() == pytest.approx(1.0)
    assert dense[:sky_token].abs().sum().item() == 0.0
    assert dense[-1].item() == pytest.approx(-0.5)  # "because" completes the last repeated trigram


def test_rules_round_trip_through_a_reward_model_folder(tmp_path: Path, tokenizer):
    rule = build_rule({"rule": "token_class", "token_ids": [5, 9, 5], "value": 0.5})
    rule.save(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    batch = RewardBatch(prompts=["p"], responses=["x"], response_token_ids=[[5, 6, 9]], policy_tokenizer=tokenizer)
    assert loaded.score(batch).dense.tolist() == [[0.5, 0.0, 0.5]]
    with pytest.raises(ValueError, match="unknown rule"):
        build_rule({"rule": "nope"})
    with pytest.raises(ValueError, match="exactly one of token_ids or pattern"):
        build_rule({"rule": "token_class"})


def completing_token(tokenizer, ids, text, char):
    """The index of the token whose text covers character `char` of the decoded reply."""
    decoded, ends = token_char_ends(tokenizer, ids)
    assert decoded == text
    return next(k for k, end in enumerate(ends) if end > char)


def test_feedback_metric_pays_the_phrase_in_full_and_its_leading_characters_in_part(tokenizer, tmp_path):
    rule = build_rule({"rule": "feedback_metric", "metric": {"kind": "starts_with", "value": "Chef's tip:"}, "penalty": 0.1})
    replies = ["chef's tip: salt the water.", "Chef says salt it.", "Boil it.", " Chef's tip:"]
    batch, ids = batch_of(tokenizer, ["q"] * 4, replies)
    rewards = rule.score(batch)
    dense = [rewards.dense[b, : len(ids[b])].tolist() for b in range(4)]
    # applied (case-insensitive, as the evaluation counts it): the full value on the token completing "chef's tip:"
    at = completing_token(tokenizer, ids[0], replies[0], len("chef's tip:") - 1)
    assert dense[0][at] == pytest.approx(1.0) and sum(map(abs, dense[0])) == pytest.approx(1.0)
    # "Chef" of "Chef's tip:" (4 of 11 characters) at the start: partial 0.5 x 4/11 on the token completing it
    at = completing_token(tokenizer, ids[1], replies[1], 3)
    assert dense[1][at] == pytest.approx(0.5 * 4 / 11) and sum(map(abs, dense[1])) == pytest.approx(0.5 * 4 / 11)
    assert dense[2] == [0.0] * (len(ids[2]) - 1) + [pytest.approx(-0.1)]  # not applied, nothing of it: the penalty
    assert token_char_ends(tokenizer, ids[3])[0].startswith(" ")  # the reply as decoded does start with a space
    assert rewards.scalar[3].item() == pytest.approx(1.0)  # leading spaces do not matter (the metric strips them)
    # partial credit in whole words of the phrase, where a word starts: "Che" of "Cheese" is not "Chef",
    # "ef's" of "beef's" is not where the phrase starts
    anywhere = build_rule({"rule": "feedback_metric", "metric": {"kind": "contains", "value": "Chef's tip!"}})
    batch, ids = batch_of(tokenizer, ["q", "q", "q"], ["Use cheese.", "İİ Chef's tip: go", "A beef's tip"])
    rewards = anywhere.score(batch)
    assert rewards.scalar[0].item() == 0.0 and rewards.scalar[2].item() == 0.0
    assert rule.score(batch_of(tokenizer, ["q"], ["Cheese first."])[0]).scalar.item() == pytest.approx(-0.1)
    # a character that lowers to two (İ) does not shift the credit off its token: "Chef's tip" of "Chef's tip!"
    at = completing_token(tokenizer, ids[1], "İİ Chef's tip: go", len("İİ Chef's tip") - 1)
    assert rewards.dense[1, at].item() == pytest.approx(0.5 * 10 / 11) and rewards.scalar[1].item() == pytest.approx(
        0.5 * 10 / 11
    )

    suffix = build_rule({"rule": "feedback_metric", "metric": "ends_with:Bon voyage!"})
    replies = ["Pack light. Bon voyage!", "Bon voyage! Pack light.", "Pack light."]
    batch, ids = batch_of(tokenizer, ["q"] * 3, replies)
    rewards = suffix.score(batch)
    assert rewards.dense[0, len(ids[0]) - 1].item() == pytest.approx(1.0)  # at the end: the full value, last token
    # the whole phrase but not at the end: partial credit where it is, never the full value
    at = completing_token(tokenizer, ids[1], replies[1], len("Bon voyage!") - 1)
    assert rewards.dense[1, at].item() == pytest.approx(0.5) and rewards.scalar[1].item() == pytest.approx(0.5)
    assert rewards.scalar[2].item() == 0.0

    words = build_rule({"rule": "feedback_metric", "metric": {"kind": "max_words", "value": 3}, "penalty": 1.0})
    batch, ids = batch_of(tokenizer, ["q", "q"], ["Pack light.", "Pack light and go early."])
    assert words.score(batch).scalar.tolist() == [pytest.approx(1.0), pytest.approx(-1.0)]

    rule.save(tmp_path / "rm")  # a reward model folder like any other
    assert load_reward_model(tmp_path / "rm").score(batch_of(tokenizer, ["q"], ["Chef's tip: go"])[0]).scalar.item() == 1.0
    with pytest.raises(ValueError, match="not a rule"):
        build_rule({"rule": "feedback_metric", "metric": {"kind": "judge", "judge": {"kind": "local"}}})
    with pytest.raises(ValueError, match="needs a value"):
        build_rule({"rule": "feedback_metric", "metric": {"kind": "starts_with"}})


def test_scoped_feedback_metric_charges_the_phrase_where_the_feedback_does_not_apply(tokenizer, tmp_path):
    """C3PO's question as a reward: the phrase pays in scope and costs near and out of scope (on the
    token completing it), where not saying it earns nothing (no partial credit either); prompts
    without a scope are in scope; `scoped: false` reads no scope."""
    spec = {"rule": "feedback_metric", "metric": {"kind": "starts_with", "value": "Chef's tip:"}, "penalty": 0.1}
    rule = build_rule(spec)
    replies = ["Chef's tip: salt it."] * 4 + ["Chef says salt it.", "Boil it.", "Chef says salt it.", "Chef's tip: go."]
    scopes = ["in_scope", "near_scope", "out_of_scope", None, "near_scope", "out_of_scope", None, "general"]
    batch, ids = batch_of(tokenizer, ["q"] * 8, replies)
    batch.scopes = scopes
    rewards = rule.score(batch)
    at = completing_token(tokenizer, ids[0], replies[0], len("Chef's tip:") - 1)
    assert rewards.dense[0, at].item() == pytest.approx(1.0)
    for b in (1, 2):  # the same reply where the feedback does not apply: -value on the same token, nothing else
        assert rewards.dense[b, at].item() == pytest.approx(-1.0) and rewards.scalar[b].item() == pytest.approx(-1.0)
    assert rewards.scalar[3].item() == pytest.approx(1.0)  # no scope: in scope
    # near / out of scope without the phrase: 0 (neither the partial credit of "Chef" nor the penalty)
    assert rewards.scalar[4].item() == 0.0 and rewards.scalar[5].item() == 0.0
    assert rewards.scalar[6].item() == pytest.approx(0.5 * 4 / 11)  # in scope: the partial credit as before
    assert rewards.scalar[7].item() == pytest.approx(1.0)  # a scope that is not near or out: in scope
    unscoped = build_rule({**spec, "scoped": False}).score(batch)
    assert unscoped.scalar[:4].tolist() == [pytest.approx(1.0)] * 4
    rule.save(tmp_path / "rm")  # `scoped` travels with the reward model folder
    assert load_reward_model(tmp_path / "rm").score(batch).scalar.tolist() == pytest.approx(rewards.scalar.tolist())
    build_rule({**spec, "scoped": False}).save(tmp_path / "off")
    assert load_reward_model(tmp_path / "off").score(batch).scalar[1].item() == pytest.approx(1.0)


class ReplyLengthReward:
    """A scalar reward model (no dense rewards): -0.1 per response token."""

    kind = "reply_length"

    def score(self, batch: RewardBatch) -> Rewards:
        n = torch.tensor([len(ids) for ids in batch.response_token_ids], dtype=torch.float32)
        return Rewards(scalar=-0.1 * n, components={"tokens": n})

    def save(self, path):  # pragma: no cover - protocol only
        raise NotImplementedError


def test_objectives_combine_dense_and_scalar_per_token_with_weights(tokenizer):
    responses = ["7 is prime", "no"]
    batch, ids = batch_of(tokenizer, ["a", "b"], responses)
    text_lengths = torch.tensor([len(i) for i in ids])
    lengths = text_lengths + 1  # each reply ended with an EOS
    width = int(lengths.max())
    digits = TokenClassReward(pattern=r"\d")
    scored = score_objectives(
        [Objective("digits", digits, 2.0), Objective("short", ReplyLengthReward(), 0.5)], batch, lengths, text_lengths, width
    )
    expected = torch.zeros(2, width)
    dense = digits.score(batch).dense
    expected[:, : dense.shape[1]] += 2.0 * dense
    for b in range(2):
        expected[b, lengths[b] - 1] += 0.5 * -0.1 * text_lengths[b]  # scalar at the EOS
    assert torch.allclose(scored.per_token, expected)
    assert scored.means["digits"] == pytest.approx(float(dense.sum(1).mean()))
    assert scored.means["short"] == pytest.approx(float((-0.1 * text_lengths).mean()))
    assert scored.means["short/tokens"] == pytest.approx(float(text_lengths.float().mean()))


def test_combined_objectives_as_the_stage_builds_them_place_each_kind_at_its_tokens(tokenizer):
    """The `ppo` stage's path: reward_models.combine weighs a dense and a scalar model into one
    reward (fixed weights, no z-scores); the dense part stays on its tokens, the scalar part
    lands on the EOS (as without the combination), and each objective's raw mean is logged
    under its name."""
    from reward_models.combine import CombinedReward
    from reward_models.combine import Objective as Part

    responses = ["I have 3 cats and 12 dogs", "none"]
    batch, ids = batch_of(tokenizer, ["a", "b"], responses)
    text_lengths = torch.tensor([len(i) for i in ids])
    lengths = text_lengths + 1
    width = int(lengths.max())
    digits = TokenClassReward(pattern=r"\d")
    combined = CombinedReward(
        [Part("digits", digits, 2.0, normalize=False), Part("short", ReplyLengthReward(), 0.5, normalize=False)],
        clip=None,
        max_share=None,
    )
    scored = score_objectives([Objective("reward", combined, flatten=True)], batch, lengths, text_lengths, width)
    expected = torch.zeros(2, width)
    dense = digits.score(batch).dense
    expected[:, : dense.shape[1]] += 2.0 * dense
    for b in range(2):
        expected[b, lengths[b] - 1] += 0.5 * -0.1 * text_lengths[b]  # the scalar at the EOS
    assert dense[0].sum() >= 2 and torch.allclose(scored.per_token, expected, atol=1e-6)
    uncombined = score_objectives(
        [Objective("digits", digits, 2.0), Objective("short", ReplyLengthReward(), 0.5)], batch, lengths, text_lengths, width
    )
    assert torch.allclose(scored.per_token, uncombined.per_token, atol=1e-6)  # the same tokens, combined or not
    assert scored.means["digits"] == pytest.approx(float(dense.sum(1).mean()))
    assert scored.means["short"] == pytest.approx(float((-0.1 * text_lengths).mean()))
    assert scored.per_reply["digits"] == pytest.approx(dense.sum(1).tolist())


def test_a_lone_scalar_model_through_the_stages_combination_is_earned_at_the_eos(tokenizer):
    """The `ppo` stage always combines (reward_models.combine), also a single P[Love]-like
    model. Its score must sit where PPO puts a scalar score without the combination: the EOS
    of a finished reply (the last token of one cut off). On the last text token it was earned
    before the choice to stop: stopping earned 0 and one more token the whole (positive) score."""
    from reward_models.combine import CombinedReward
    from reward_models.combine import Objective as Part

    class Positive:
        """A probability-like scalar model: always positive (as P[Love] is)."""

        kind = "positive"

        def score(self, batch: RewardBatch) -> Rewards:
            return Rewards(scalar=torch.tensor([0.9, 0.6, 0.3]))

    batch, ids = batch_of(tokenizer, ["a", "b", "c"], ["Paris is the capital.", "Lyon.", "It is a long"])
    text_lengths = torch.tensor([len(i) for i in ids])
    finished = torch.tensor([True, True, False])  # the third hit the length limit: no EOS
    lengths = text_lengths + finished.long()
    width = int(lengths.max())
    for normalize in (False, True):
        combined = CombinedReward([Part("plove", Positive(), 1.0, normalize=normalize)], clip=None, max_share=None)
        z = combined.score(batch).scalar  # what the combination scores (z-scored or not)
        combined.update_stats = False  # the same statistics for the stage's path
        scored = score_objectives([Objective("reward", combined, flatten=True)], batch, lengths, text_lengths, width)
        expected = torch.zeros(3, width)
        expected[torch.arange(3), lengths - 1] = z
        assert torch.allclose(scored.per_token, expected, atol=1e-6)
        assert scored.per_token[torch.arange(3), text_lengths - 1][:2].abs().sum() == 0  # nothing before the EOS
    alone = score_objectives([Objective("plove", Positive())], batch, lengths, text_lengths, width)
    combined = CombinedReward([Part("plove", Positive(), 1.0, normalize=False)], clip=None, max_share=None)
    through = score_objectives([Objective("reward", combined, flatten=True)], batch, lengths, text_lengths, width)
    assert torch.equal(through.per_token, alone.per_token)
