"""Conversations of several conditions run side by side (`run_sides`): each side's policy writes
its turns in its own weights, sides with the same policy and weights in one call; the simulated
users answer, judge and give feedback for every side in one call per round, each row to its own
conversation. And the judge's instructions, run once, serve the calls after (`PrefixMemo`)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from feedback.simulator import prompts
from feedback.simulator.protocol import Judge, ProtocolSettings, Side, SimulatedUser, clean_user_text, run_sides
from pipeline.chat import render_many
from pipeline.generation import SamplingSettings
from pipeline.llm import HFClient
from pipeline.llm_cache import CachedLLM
from pipeline.prefix_logits import PrefixMemo, last_token_logits

#: which weights context is entered (None: none); the recording client notes it with each call
ACTIVE: list[str] = []


class Recording(HFClient):
    """The tiny model on HF, noting each call's rows, replies and the weights context it ran in."""

    def __init__(self) -> None:
        super().__init__("tiny", batch_size=16, engine="hf")
        self.generated: list[tuple[str | None, list, list[str]]] = []
        self.seeds: list[int] = []
        self.asked_yes: list[int] = []

    def generate(self, conversations, sampling, seed=0):
        out = super().generate(conversations, sampling, seed)
        self.seeds.append(seed)
        self.generated.append((ACTIVE[-1] if ACTIVE else None, conversations, [c.text for c in out]))
        return out

    def yes_probability(self, conversations):
        self.asked_yes.append(len(conversations))
        return super().yes_probability(conversations)


def weights(name: str):
    @contextmanager
    def entered():
        ACTIVE.append(name)
        try:
            yield
        finally:
            ACTIVE.pop()

    return entered


def never_satisfied() -> ProtocolSettings:
    """Two rounds with feedback after every reply (threshold 1), no clarifying questions, short
    sampled turns (tiny's greedy replies are blank)."""
    return ProtocolSettings(
        max_rounds=2,
        max_clarifications=0,
        satisfied_threshold=1.0,
        policy_sampling=SamplingSettings(max_new_tokens=4, temperature=1.0),
        user_sampling=SamplingSettings(max_new_tokens=3, temperature=1.0),
    )


def test_sides_take_their_turns_in_their_own_weights_and_the_users_answer_all_in_one_call(tiny_model_path):
    policy_client, simulator_client = Recording(), Recording()
    simulator = CachedLLM(simulator_client, None)
    judge = Judge(simulator, "both").calibrate()
    simulator_client.generated.clear()
    simulator_client.asked_yes.clear()
    users = [SimulatedUser(f"u{i}", need, request) for i, (need, request, _, _) in enumerate(prompts.CALIBRATION[::2][:3])]
    brief = [replace(u, system_prompt="Answer in one word.") for u in users]
    off, on = weights("off"), weights("on")
    shared = CachedLLM(policy_client, None)
    sides = [
        Side(users, shared, off),
        Side(brief, shared, off),  # the same policy and weights: its turns join the first side's call
        Side([replace(u) for u in users], CachedLLM(policy_client, None), on),  # another policy: a call of its own
    ]
    settings = never_satisfied()
    transcripts = run_sides(sides, simulator, settings, seed=5, judge=judge)

    # the policy: per round one call for the two sides that share it (6 rows) in their weights, one for the third
    assert [(active, len(rows)) for active, rows, _ in policy_client.generated] == [("off", 6), ("on", 3)] * 2
    first_call = policy_client.generated[0][1]
    assert [rows[0]["role"] for rows in first_call] == ["user"] * 3 + ["system"] * 3  # the second side's system prompt
    # the users: per round one feedback call and one judgment for all nine conversations, outside any side's weights
    assert [(active, len(rows)) for active, rows, _ in simulator_client.generated] == [(None, 9), (None, 9)]
    assert simulator_client.asked_yes == [9, 9]

    # every row went back to its own conversation: its reply, its judgment, its feedback
    assert [len(ts) for ts in transcripts] == [3, 3, 3]
    replies = {}
    for active, rows, texts in policy_client.generated:
        for messages, text in zip(rows, texts):
            replies[(active, repr(messages))] = text
    feedback = {repr(rows): text for _, calls, texts in simulator_client.generated for rows, text in zip(calls, texts)}
    for side, ts in zip(sides, transcripts):
        assert [t.user for t in ts] == side.users
        for t in ts:
            assert [u.type for u in t.utterances] == ["question", "response", "feedback", "response", "feedback"]
            for k in (1, 3):
                said, heard = t.utterances[k], t.utterances[k + 1]
                seen = [{"role": "system", "content": t.user.system_prompt}] if t.user.system_prompt else []
                seen += [
                    {"role": "user" if u.participant == "user" else "assistant", "content": u.text} for u in t.utterances[:k]
                ]
                assert said.text == replies[("on" if side.weights is on else "off", repr(seen))]
                alone = judge.satisfaction([(t.user.need, t.user.request, said.text)], salts=["alone"])[0]
                assert said.satisfaction == pytest.approx(alone, abs=1e-4)
                asked = prompts.feedback_messages(t.user.need, t.user.request, said.text, t.user.persona, t.user.style)
                written = clean_user_text(feedback[repr(asked)])
                assert heard.text == written or heard.text.startswith("That is not what I need")  # or the fallback
    assert len({t.utterances[1].satisfaction for ts in transcripts for t in ts}) > 3  # rows differ: a swap would show


def test_one_side_makes_the_calls_a_side_alone_makes(tiny_model_path):
    policy_client, simulator_client = Recording(), Recording()
    simulator = CachedLLM(simulator_client, None)
    judge = Judge(simulator, "verbal").calibrate()
    users = [SimulatedUser(f"u{i}", need, request) for i, (need, request, _, _) in enumerate(prompts.CALIBRATION[:2])]
    settings = never_satisfied()
    (ts,) = run_sides([Side(users, CachedLLM(policy_client, None))], simulator, settings, seed=1, judge=judge)
    # per round: the policy for both users (seed + 1000 x round), then their feedback (+ 2), in the users' order
    assert [(active, len(rows)) for active, rows, _ in policy_client.generated] == [(None, 2), (None, 2)]
    assert policy_client.seeds == [1001, 2001] and simulator_client.seeds == [1003, 2003]
    for (_, rows, _), rnd in zip(policy_client.generated, (1, 2)):
        assert [r[0]["content"] for r in rows] == [u.request for u in users] and len(rows[0]) == 2 * rnd - 1
    assert [t.user for t in ts] == users and all(len(t.utterances) == 5 for t in ts)


def test_a_turn_two_sides_ask_word_for_word_is_sampled_once(tiny_model_path):
    """Two conditions that ask the same thing (memory that recalled nothing, beside the base): one
    sample, so their conversations are the same and their paired difference exactly zero."""
    policy_client, simulator_client = Recording(), Recording()
    simulator = CachedLLM(simulator_client, None)
    judge = Judge(simulator, "verbal").calibrate()
    users = [SimulatedUser(f"u{i}", need, request) for i, (need, request, _, _) in enumerate(prompts.CALIBRATION[:3:2])]
    policy, same = CachedLLM(policy_client, None), weights("off")
    settings = never_satisfied()
    sides = [Side(users, policy, same), Side([replace(u) for u in users], policy, same)]
    a, b = run_sides(sides, simulator, settings, seed=2, judge=judge)
    assert [len(rows) for _, rows, _ in policy_client.generated] == [2, 2]  # asked for 4 rows a round, 2 sampled
    assert [len(rows) for _, rows, _ in simulator_client.generated] == [2, 2]
    assert [t.utterances for t in a] == [t.utterances for t in b]
    assert a[0].utterances[1].text != a[1].utterances[1].text  # two users, two samples


def judge_token_lists(tokenizer, items) -> list[list[int]]:
    texts = render_many(tokenizer, [prompts.judge_messages(*item) for item in items])
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_a_kept_start_serves_later_calls_with_the_same_numbers(tiny_model_path, monkeypatch):
    import pipeline.prefix_logits as prefix_logits

    client = HFClient("tiny", batch_size=4, engine="hf")
    items = [(n, r, a) for n, r, a, _ in prompts.CALIBRATION]
    runs: list[int] = []
    real = prefix_logits.run_prefix
    monkeypatch.setattr(prefix_logits, "run_prefix", lambda model, prefix: runs.append(len(prefix)) or real(model, prefix))
    memo = PrefixMemo()
    pad = client.tokenizer.pad_token_id or 0
    calls = [judge_token_lists(client.tokenizer, c) for c in (items[:4], items[4:5], items[5:8])]  # one of a single prompt
    kept = [last_token_logits(client.model, token_lists, 2, pad, memo) for token_lists in calls]
    # the first call's prompts share more than the instructions ("I want: the"), the third's less: the
    # start kept is the part they share with it, run once more, then for every call after
    assert runs[0] > runs[1] == len(memo.tokens) > 100 and len(runs) == 2
    assert memo.covers(calls[1]) and memo.covers(calls[2]) and memo.covers(judge_token_lists(client.tokenizer, items))
    for token_lists, got in zip(calls, kept):
        plain = last_token_logits(client.model, token_lists, 2, pad)  # no memo: each call its own shared start, or none
        torch.testing.assert_close(got, plain, atol=1e-4, rtol=1e-4)
    assert len(runs) == 2 + 2  # the plain calls ran theirs (the single prompt has none to share)
    # a call that does not start with the kept start runs its own, and keeps it
    changed = [[t + 1 for t in ids] for ids in calls[0][:2]]
    assert not memo.covers(changed)
    last_token_logits(client.model, changed, 2, pad, memo)
    assert len(runs) == 5 and memo.covers(changed) and memo.tokens == changed[0][: len(memo.tokens)]


def test_a_client_keeps_the_judges_start_only_for_weights_it_loaded(tiny_model_path):
    owned = HFClient("tiny", batch_size=4, engine="hf")
    conversations = [prompts.judge_messages(n, r, a) for n, r, a, _ in prompts.CALIBRATION[:3]]
    first = owned.yes_probability(conversations)
    assert owned._memo is not None and len(owned._memo.tokens) > 100  # the judge's instructions, kept
    assert owned.yes_probability(conversations) == pytest.approx(first, abs=1e-6)
    # weights handed in may change between calls (a policy in training): the start is rerun each call
    lent = HFClient("tiny", batch_size=4, model=owned.model, tokenizer=owned.tokenizer)
    assert lent._memo is None
    before = lent.yes_probability(conversations)
    with torch.no_grad():
        for p in owned.model.model.layers[0].parameters():
            p.add_(0.05)
    after = lent.yes_probability(conversations)
    yes, no = (owned.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
    items = [(n, r, a) for n, r, a, _ in prompts.CALIBRATION[:3]]
    logits = last_token_logits(owned.model, judge_token_lists(owned.tokenizer, items), 4, owned.tokenizer.pad_token_id or 0)
    assert after == pytest.approx(logits[:, [yes, no]].softmax(-1)[:, 0].tolist(), abs=1e-5)  # the changed weights' numbers
    assert after != pytest.approx(before, abs=1e-4)
