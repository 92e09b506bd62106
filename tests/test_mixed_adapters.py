"""Conditions that differ only in the adapter share batches (PEFT's mixed-batch LoRA): each row is
written with its own adapter, or none, exactly as a call of its condition alone writes it; the
evaluation's held-out replies and its simulated users' policy turns take one call for all the
conditions instead of one each, and a base row and an adapter row asking the same are two replies."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from feedback.simulator import prompts
from feedback.simulator.protocol import Judge, ProtocolSettings, Side, SimulatedUser, run_sides
from pipeline.evaluation.conditions import Answering, Condition
from pipeline.generation import BASE_ROWS, SamplingSettings, chat_generate
from pipeline.llm import HFClient
from pipeline.llm_cache import CachedLLM
from pipeline.models import device_policy, load_causal_lm, load_tokenizer

GREEDY = SamplingSettings(max_new_tokens=6, temperature=0.0)
QUESTIONS = ["Why is the sky blue?", "Name a river.", "How do bees make honey?", "What is copper used for?"]


@pytest.fixture(scope="module")
def peft_tiny(tiny_model_path, lora_adapter):
    return load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter).eval(), load_tokenizer("tiny"), lora_adapter


def conversations() -> list:
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def texts(completions) -> list[str]:
    return [c[0].text if isinstance(c, list) else c.text for c in completions]


def test_each_row_is_written_with_its_own_adapter(peft_tiny):
    model, tokenizer, _ = peft_tiny
    with model.disable_adapter():
        base = texts(chat_generate(model, tokenizer, conversations(), GREEDY, batch_size=8))
    tuned = texts(chat_generate(model, tokenizer, conversations(), GREEDY, batch_size=8))
    assert base != tuned  # the adapter changes the replies: a row given the wrong weights would show
    mixed = texts(
        chat_generate(
            model,
            tokenizer,
            conversations() + conversations(),
            GREEDY,
            batch_size=8,
            adapters=[BASE_ROWS] * 4 + ["default"] * 4,
        )
    )
    assert mixed == base + tuned
    interleaved = texts(
        chat_generate(model, tokenizer, conversations(), GREEDY, batch_size=3, adapters=["default", BASE_ROWS] * 2)
    )
    assert interleaved == [tuned[0], base[1], tuned[2], base[3]]  # across batches of 3, in row order


def answering(model, tokenizer, adapter, log, *extra: Condition) -> Answering:
    return Answering(
        model=model,
        tokenizer=tokenizer,
        conditions=[Condition(name="base"), *extra, Condition(name="tuned", adapter_on=True)],
        system_for=lambda c, p: "Answer briefly." if c.system == "feedback" else None,
        model_name="tiny",
        adapter=adapter,
        device="cpu",
        seed=0,
        batch_size=16,
        resamples=100,
        log=log,
        share_batches=True,
    )


def test_the_evaluations_held_out_replies_share_one_call(peft_tiny, monkeypatch):
    import trainers.feedback_eval as feedback_eval
    from pipeline.chat import as_messages

    model, tokenizer, adapter = peft_tiny
    ans = answering(model, tokenizer, adapter, logging.getLogger("test"))
    asked = [[as_messages(q, ans.system_for(c, q)) for q in QUESTIONS] for c in ans.conditions]
    alone = {c.name: texts(ans.replies(c, convs, GREEDY)) for c, convs in zip(ans.conditions, asked)}
    calls = []
    real = feedback_eval.sample_completions
    monkeypatch.setattr(feedback_eval, "sample_completions", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    together = ans.replies_of(ans.conditions, asked, GREEDY)
    assert calls == [8]  # base and adapter, one call
    assert {name: texts(found) for name, found in together.items()} == alone
    assert alone["base"] != alone["tuned"]

    calls.clear()  # sampled: a condition's draws must not depend on who ran beside it
    ans.replies_of(ans.conditions, asked, SamplingSettings(max_new_tokens=4, temperature=1.0))
    assert calls == [4, 4]
    calls.clear()  # a condition with a system prompt of its own keeps its call (its shared start once)
    with_feedback = answering(model, tokenizer, adapter, ans.log, Condition(name="in_context", system="feedback"))
    three = [[as_messages(q, with_feedback.system_for(c, q)) for q in QUESTIONS] for c in with_feedback.conditions]
    found = with_feedback.replies_of(with_feedback.conditions, three, GREEDY)
    assert calls == [8, 4]  # base and adapter shared, in_context alone
    assert texts(found["base"]) == alone["base"] and texts(found["tuned"]) == alone["tuned"]
    calls.clear()  # more rows than one batch: each condition its own batches
    ans.batch_size = 6
    ans.replies_of(ans.conditions, asked, GREEDY)
    assert calls == [4, 4]
    ans.batch_size = 16
    calls.clear()  # only the evaluate stage shares batches (c3po's and evaluate_feedback's evaluations keep theirs)
    ans.share_batches = False
    ans.replies_of(ans.conditions, asked, GREEDY)
    assert calls == [4, 4]


@pytest.mark.parametrize(
    "kind, shares",
    [("lora", True), ("dora", False), ("ia3", False)],  # PEFT's IA3 drops adapter_names silently; DoRA refuses it
)
def test_only_a_plain_lora_adapter_is_switched_per_row(tiny_model_path, kind, shares):
    from peft import IA3Config, LoraConfig, get_peft_model

    from pipeline.evaluation.conditions import switches_per_row

    if kind == "ia3":
        config = IA3Config(task_type="CAUSAL_LM")
    else:
        config = LoraConfig(r=4, use_dora=kind == "dora", task_type="CAUSAL_LM")
    model = get_peft_model(load_causal_lm("tiny", device_policy("cpu")), config)
    assert switches_per_row(model) is shares
    assert switches_per_row(load_causal_lm("tiny", device_policy("cpu"))) is False  # no adapter at all
    model.active_adapter = []  # what PEFT leaves after deleting the active adapter
    assert switches_per_row(model) is False


def test_simulated_users_policy_turns_share_one_call_and_keep_their_adapter(peft_tiny):
    model, tokenizer, _ = peft_tiny
    asked: list[int] = []

    class Counting(HFClient):
        def generate(self, conversations, sampling, seed=0, adapters=None):
            asked.append(len(conversations))
            return super().generate(conversations, sampling, seed, adapters=adapters)

    policy = CachedLLM(Counting("tiny", batch_size=16, model=model, tokenizer=tokenizer), None)
    simulator = CachedLLM(HFClient("tiny", batch_size=16, engine="hf"), None)
    judge = Judge(simulator, "verbal").calibrate()
    users = [SimulatedUser(f"u{i}", need, request) for i, (need, request, _, _) in enumerate(prompts.CALIBRATION[:3])]
    settings = ProtocolSettings(
        max_rounds=2,
        max_clarifications=0,
        satisfied_threshold=1.0,
        policy_sampling=GREEDY,
        user_sampling=SamplingSettings(max_new_tokens=3, temperature=1.0),
    )
    sides = [Side(users, policy, adapter=BASE_ROWS), Side([replace(u) for u in users], policy, adapter="default")]
    base, tuned = run_sides(sides, simulator, settings, seed=3, judge=judge)
    assert asked == [6, 6]  # per round one call for both sides
    first = [[{"role": "user", "content": u.request}] for u in users]
    with model.disable_adapter():
        expected_base = texts(chat_generate(model, tokenizer, first, GREEDY, batch_size=16, seed=1003))
    expected_tuned = texts(chat_generate(model, tokenizer, first, GREEDY, batch_size=16, seed=1003))
    assert expected_base != expected_tuned  # the same request and salt on both sides: two different replies
    assert [t.utterances[1].text for t in base] == expected_base
    assert [t.utterances[1].text for t in tuned] == expected_tuned
