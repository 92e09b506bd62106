"""pipeline/chat.py and pipeline/pairs.py: one rendering, one prompt id, one pairing for everyone."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.chat import (
    as_messages,
    last_user_text,
    prompt_id,
    prompt_text,
    render,
    render_ids,
    reply_text,
    row_messages,
    split_prompt,
)
from pipeline.pairs import best_vs_worst


def test_messages_from_strings_and_conversations():
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    assert as_messages("hi", "be brief") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    conv = [{"role": "system", "content": "ctx"}, {"role": "user", "content": "q", "name": "x"}]
    assert as_messages(conv, "ignored: the conversation has its own") == [
        {"role": "system", "content": "ctx"},
        {"role": "user", "content": "q"},
    ]
    assert row_messages({"prompt": "q", "system_prompt": "s"}) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
    ]
    with pytest.raises(TypeError, match="one message"):
        as_messages({"role": "user", "content": "q"})


def test_prompt_id_keeps_generates_scheme_and_ignores_spelling():
    # `generate` always wrote sha1(text)[:12] for string prompts: old response files still group
    assert prompt_id("Why is the sky blue?") == hashlib.sha1(b"Why is the sky blue?").hexdigest()[:12]
    assert prompt_id([{"role": "user", "content": "Why is the sky blue?"}]) == prompt_id("Why is the sky blue?")
    conv = [{"role": "system", "content": "ctx"}, {"role": "user", "content": "q"}]
    assert prompt_id(conv) == hashlib.sha1(json.dumps(conv, sort_keys=True).encode()).hexdigest()[:12]
    assert prompt_id(conv) != prompt_id("q")


def test_text_views_of_a_conversation():
    conv = [
        {"role": "system", "content": "passage"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert prompt_text(conv) == "passage\nq1\nq2"
    assert last_user_text(conv) == "q2"
    assert split_prompt(conv) == ("q1\nassistant: a1\nq2", "system: passage")


def test_one_reading_of_a_reply_for_every_consumer():
    """Reward models, SFT, CoH and Argilla read a reply the same way: a multi-message completion is
    its assistant messages (a tool result between them is not the reply), not its last message."""
    from feedback.argilla_templates import reply_text as argilla_reply
    from trainers.coh import chains_from_preferences
    from trainers.sft import from_preferences

    reply = [
        {"role": "assistant", "content": "Let me look that up."},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "capital_of"}}]},
        {"role": "tool", "content": "{'capital': 'Canberra'}"},
        {"content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "Canberra."}]},
    ]
    assert reply_text(reply) == "Let me look that up.\n\nIt is Canberra."  # the tool call has no words
    assert reply_text("plain") == "plain" and reply_text([]) == ""
    assert argilla_reply is reply_text
    row = {"prompt": "Capital of Australia?", "chosen": reply, "rejected": [{"role": "assistant", "content": "Sydney."}]}
    assert from_preferences([row])[0]["reply"] == reply_text(reply)
    chain = chains_from_preferences([row])[0]
    assert (chain["positive"], chain["negative"]) == (reply_text(reply), "Sydney.")


def test_render_uses_the_chat_template_or_plain_text(tiny_model_path):
    from pipeline.models import load_tokenizer

    tok = load_tokenizer("tiny")
    text = render(tok, "hello", "be brief")
    assert text == tok.apply_chat_template(as_messages("hello", "be brief"), tokenize=False, add_generation_prompt=True)
    assert render_ids(tok, "hello") == tok(render(tok, "hello"), add_special_tokens=False)["input_ids"]

    class NoTemplate:
        chat_template = None

    assert render(NoTemplate(), [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "s\nu"


def test_best_vs_worst_pairs_by_prompt_and_skips_ties_and_small_margins():
    rows = [
        {"prompt_id": "a", "prompt": "q", "system_prompt": "s", "response": r, "score": v, "sample_index": i}
        for i, (r, v) in enumerate([("x", 0.2), ("y", 0.9), ("z", 0.5)])
    ]
    rows += [
        {"prompt_id": "b", "prompt": "p", "response": "same", "score": 1.0},
        {"prompt_id": "b", "prompt": "p", "response": "same", "score": 0.0},
    ]
    rows += [
        {"prompt_id": "c", "prompt": "r", "response": "u", "score": 0.5},
        {"prompt_id": "c", "prompt": "r", "response": "v", "score": 0.45},
    ]
    pairs = best_vs_worst(rows, "score", min_margin=0.1, source="t")
    assert len(pairs) == 1
    assert pairs[0] == {
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "y"}],
        "rejected": [{"role": "assistant", "content": "x"}],
        "prompt_id": "a",
        "score_chosen": 0.9,
        "score_rejected": 0.2,
        "source": "t",
    }
    every = best_vs_worst(rows[:3], "score", all_pairs=True)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in every] == [("y", "z"), ("y", "x"), ("z", "x")]
    # rows without a prompt_id group by the id of their prompt
    loose = [
        {"prompt": [{"role": "user", "content": "q"}], "response": "a", "r": 1.0},
        {"prompt": "q", "response": "b", "r": 0.0},
    ]
    assert [p["prompt_id"] for p in best_vs_worst(loose, "r")] == [prompt_id("q")]


def test_generate_keeps_a_message_list_prompt(tmp_path, tiny_model_path, monkeypatch):
    """A chat-message prompt (which ppo accepts) is sampled as a conversation, not as the
    str() of a Python list, and the record keeps it as messages."""
    from pipeline.config import pipeline_from_dict
    from pipeline.generation import LocalEngine
    from pipeline.records import load_rows, write_jsonl
    from pipeline.runner import Runner

    asked: list = []
    generate = LocalEngine.generate

    def spy(self, conversations, *args, **kwargs):  # what the engine is asked to continue, then the real call
        asked.extend(conversations)
        return generate(self, conversations, *args, **kwargs)

    monkeypatch.setattr(LocalEngine, "generate", spy)

    conv = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    single = [{"role": "user", "content": "Name a fruit."}]
    write_jsonl([{"prompt": conv}, {"prompt": single}], tmp_path / "prompts.jsonl")
    data = {
        "run_name": "g",
        "model": "tiny",
        "stages": [
            {
                "name": "gen",
                "uses": "generate",
                "inputs": {"prompts": str(tmp_path / "prompts.jsonl")},
                "with": {"num_samples": 1, "sampling": {"max_new_tokens": 3}, "device": "cpu", "engine": "hf"},
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    rows = load_rows(result.run_dir / "gen" / "responses")
    assert asked == [conv, single]  # the messages themselves, the system turn first
    assert rows[0]["prompt"] == conv
    assert rows[0]["prompt_id"] == prompt_id(conv)
    assert rows[1]["prompt"] == single and rows[1]["prompt_id"] == prompt_id("Name a fruit.")  # same id as the text
