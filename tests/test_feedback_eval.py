"""Feedback evaluation metrics, and C3PO data generation through the OpenAI-compatible path.

No capable generator LLM runs offline here, so the generation test talks to a stand-in
OpenAI-compatible HTTP server (FakeLLMServer below, named as such) that answers with fixed
lists; the HTTP client, key handling, list parsing, scoping, baselines (from the real `tiny`
model) and revisions are the real code.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from pipeline.config import pipeline_from_dict
from pipeline.records import load_rows
from pipeline.runner import Runner
from trainers.feedback_eval import MetricSpec, applies, judge_applies, summarize


def test_programmatic_metrics():
    def check(kind, value, text, **kw):
        return applies(MetricSpec(kind=kind, value=value, **kw), text)

    assert check("starts_with", "Chef's tip:", "  chef's TIP: use salt")
    assert not check("starts_with", "Chef's tip:", "chef's TIP: use salt", case_sensitive=True)
    assert not check("starts_with", "Chef's tip:", "Use salt. Chef's tip: none")
    assert check("ends_with", "Bon appétit!", "Serve warm. Bon appétit!")
    assert check("contains", "colour", "What a lovely colour.") and not check("contains", "colour", "What a color.")
    assert check("regex", r"\bcolou?r\b", "COLOR me") and not check("regex", r"^\d+$", "12a")
    assert check("max_words", 3, "one two three") and not check("max_words", 3, "one two three four")
    assert check("min_words", 2, "one two") and check("max_chars", 5, "12345") and not check("max_chars", 5, "123456")
    assert MetricSpec.parse("starts_with:Chef's tip:") == MetricSpec(kind="starts_with", value="Chef's tip:")


def test_metric_validation():
    with pytest.raises(ValidationError, match="needs a value"):
        MetricSpec(kind="contains")
    with pytest.raises(ValidationError, match="needs a judge generator"):
        MetricSpec(kind="judge")
    with pytest.raises(ValidationError, match="invalid regex"):
        MetricSpec(kind="regex", value="(unclosed")


def test_summary_rates_and_differences_by_hand():
    rows = []
    for condition, applied in (("base", [0, 0, 0, 0]), ("trained", [1, 1, 1, 0])):
        rows += [{"condition": condition, "scope": "in_scope", "applied": a} for a in applied]
    rows += [
        {"condition": "base", "scope": "near_scope", "applied": 0},
        {"condition": "trained", "scope": "near_scope", "applied": 1},
        {"condition": "trained", "scope": "near_scope", "applied": 0},
    ]
    out = summarize(rows)
    assert out["adherence/base"] == 0.0 and out["adherence/trained"] == 0.75
    assert out["adherence_vs_base/trained"] == 0.75
    assert out["overgen_near/trained"] == 0.5 and out["overgen_near_vs_base/trained"] == 0.5
    assert "overgen_out/trained" not in out
    # each rate carries its Wilson interval (the evaluate stage's numbers)
    from pipeline.stats import wilson

    assert (out["adherence/trained/lo"], out["adherence/trained/hi"]) == pytest.approx((wilson(3, 4)["lo"], wilson(3, 4)["hi"]))


class FixedJudge:
    """A stand-in judge with canned verdicts (tests the verdict parsing only)."""

    name = "fixed"

    def __init__(self, verdicts):
        self.verdicts = verdicts
        self.asked = []

    def complete(self, conversations, seed=0):
        self.asked += conversations
        return self.verdicts


def test_judge_verdicts_are_parsed_strictly():
    judge = FixedJudge(["Yes.", " yes, it does", "No", "Yesterday I...", "It does, yes"])
    verdicts = judge_applies(judge, "Be brief.", ["p"] * 5, ["r"] * 5)
    assert verdicts == [True, True, False, False, False]
    assert "Be brief." in judge.asked[0][0]["content"]


class FakeLLMServer(BaseHTTPRequestHandler):
    """Stand-in OpenAI-compatible `/v1/chat/completions` (no capable LLM runs offline here)."""

    seen_keys: list[str] = []
    requests: list[str] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeLLMServer.seen_keys.append(self.headers.get("Authorization", ""))
        ask = body["messages"][-1]["content"]
        FakeLLMServer.requests.append(ask)
        if ask.startswith("Topic:") and "categories" in ask:
            text = "1. Baking bread\n2. Quick dinners\n3. Baking bread"
        elif "fall OUTSIDE the topic" in ask:
            cat = ask.split("Category: ")[1].split("\n")[0]
            text = "\n".join(f"{i}. How many calories are in {cat.lower()} item {i}?" for i in range(1, 5))
        elif ask.startswith("Topic:"):
            cat = ask.split("Category: ")[1].split("\n")[0]
            text = "\n".join(f"{i}) How do I cook {cat.lower()} dish {i}?" for i in range(1, 5))
        elif ask.startswith("Write"):
            cat = ask.split("about ")[1].split(".")[0]
            text = "\n".join(f"- Tell me about {cat} fact {i}." for i in range(1, 5))
        elif ask.startswith("Rewrite"):
            reply = ask.split("Reply: ", 1)[1]
            text = reply if "dish 4" in ask else f"Chef's tip: {reply}"  # one revision ignores the feedback
        else:
            text = "cooking"
        payload = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLMServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeLLMServer.seen_keys, FakeLLMServer.requests = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_c3po_data_generates_scoped_prompts_with_an_openai_compatible_llm(tmp_path, tiny_model_path, fake_llm):
    key = tmp_path / "key"
    key.write_text("sk-test-secret\n")
    os.chmod(key, 0o600)
    generator = {"kind": "openai", "base_url": fake_llm, "model": "stand-in", "api_key_file": str(key)}
    pipe = {
        "run_name": "gen",
        "model": "tiny",
        "stages": [
            {
                "name": "data",
                "uses": "c3po_data",
                "with": {
                    "feedback": 'When I ask about cooking, start with "Chef\'s tip:".',
                    "topic": "cooking",
                    "metric": {"kind": "starts_with", "value": "Chef's tip:"},
                    "generator": generator,
                    "num_categories": 3,
                    "prompts_per_category": 4,
                    "out_of_scope_categories": ["science", "travel"],
                    "eval_fraction": 0.25,
                    "baseline_sampling": {"max_new_tokens": 6},
                },
            }
        ],
    }
    result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    run = result.run_dir
    train = load_rows(run / "data" / "train")
    held_out = load_rows(run / "data" / "eval_prompts")
    everything = train + held_out
    # 2 distinct categories (the duplicate is dropped) x 4 prompts, out-of-scope 2 x 4
    assert sum(r["scope"] == "in_scope" for r in everything) + result.records[0].metrics["revisions_dropped"] == 8
    assert sum(r["scope"] == "near_scope" for r in everything) == 8
    assert sum(r["scope"] == "out_of_scope" for r in everything) == 8
    assert {r["category"] for r in everything if r["scope"] == "in_scope"} == {"Baking bread", "Quick dinners"}
    assert all(r["prompt"].startswith("How do I cook") for r in everything if r["scope"] == "in_scope")
    assert all(r["revised"].startswith("Chef's tip:") for r in train if r["scope"] == "in_scope")
    assert all("dish 4" not in r["prompt"] for r in train if r["scope"] == "in_scope")  # failed revisions dropped
    assert all(r["baseline"] is not None for r in train)
    assert all(k == "Bearer sk-test-secret" for k in FakeLLMServer.seen_keys)
    for path in (run / "data" / "manifest.json", run / "logs" / "data.log"):
        assert "sk-test-secret" not in path.read_text()


def test_api_key_file_readable_by_others_is_refused(tmp_path):
    from pipeline.llm import LLMSettings, api_key

    key = tmp_path / "key"
    key.write_text("secret")
    os.chmod(key, 0o644)
    with pytest.raises(ValueError, match="readable by others; chmod 600"):
        api_key(LLMSettings(kind="openai", model="m", api_key_file=str(key)))


def test_built_in_and_stage_evaluations_write_the_same_greedy_replies(tiny_model_path, lora_adapter):
    """The c3po stage evaluates its in-memory model on HF; `evaluate_feedback` the saved adapter through
    the generation engine (CTranslate2, merged). Greedy, both write the same replies under every
    condition: the reason a rerun of the check stage may stand in for the built-in evaluation. With a
    random adapter, so the replies differ (bare `tiny` writes one empty reply to every chat prompt)."""
    from pipeline.models import device_policy, load_causal_lm
    from trainers.feedback_eval import EvalSettings, evaluate

    prompts = [
        {"prompt": p, "scope": scope}
        for p, scope in (
            ("How do I sear a steak?", "in_scope"),
            ("What knife for tomatoes?", "in_scope"),
            ("How do I sharpen a chisel?", "near_scope"),
            ("Why is the sky blue?", "out_of_scope"),
        )
    ]
    metric = MetricSpec(kind="starts_with", value="Chef's tip:")
    feedback = "Start answers about cooking with 'Chef's tip:'."
    greedy = {"conditions": ["base", "in_context", "trained"], "sampling": {"max_new_tokens": 8, "temperature": 0.0}}
    model = load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter).eval()
    built_in, _ = evaluate("tiny", lora_adapter, prompts, feedback, metric, EvalSettings(**greedy), model=model)
    stage, _ = evaluate("tiny", lora_adapter, prompts, feedback, metric, EvalSettings(**greedy, engine="ct2"))

    def replies(rows):
        return {(r["condition"], r["prompt"]): r["response"] for r in rows}

    assert replies(stage) == replies(built_in) and len(replies(built_in)) == 12
    trained = [r["response"] for r in built_in if r["condition"] == "trained"]
    assert len(set(trained)) > 1


def test_a_chain_of_hindsight_adapter_replies_after_its_phrase_and_stop_at_the_next(tmp_path, tiny_model_path, lora_adapter):
    """A CoH adapter's `coh.json` (written by the coh stage) makes evaluation start the trained reply with
    its phrase and cut it where a feedback phrase begins. The stop phrase is taken from the middle of a
    reply the adapter writes without one, so the cut is seen to happen (the random adapter writes
    different replies per prompt; bare `tiny` writes blanks)."""
    import shutil

    from pipeline.hindsight import COH_FILE
    from trainers.feedback_eval import EvalSettings, evaluate

    adapter = tmp_path / "coh_adapter"
    shutil.copytree(lora_adapter, adapter)
    prompts = [{"prompt": p, "scope": "in_scope"} for p in ("How do I sear a steak?", "What knife for tomatoes?")]
    metric = MetricSpec(kind="contains", value="salt")
    greedy = EvalSettings(conditions=["trained"], sampling={"max_new_tokens": 12, "temperature": 0.0}, engine="hf")

    def trained_replies(stop: list[str]) -> list[str]:
        (adapter / COH_FILE).write_text(json.dumps({"phrase": "A helpful answer:", "stop": stop}))
        rows, _ = evaluate("tiny", adapter, prompts, "Mention salt.", metric, greedy)
        return [r["response"] for r in rows]

    whole = trained_replies([])
    words = whole[0].split()
    assert len(words) >= 4, whole
    phrase = " ".join(words[2:4])  # from the middle of the first reply
    cut = trained_replies([phrase])
    assert cut[0] == whole[0][: whole[0].find(phrase)].strip() and phrase not in cut[0] and cut[0]
    assert [c for c, w in zip(cut, whole) if phrase not in w] == [w for w in whole if phrase not in w]


def test_evaluate_feedback_reruns_with_another_batch_size(tmp_path, tiny_model_path):
    """HF generate seeds each batch (seed + b): replies sampled at a temperature change with the
    batch size, so a run with another one is not skipped as up to date (evaluate_feedback v2)."""
    from pipeline.records import write_jsonl

    scopes = ("in_scope", "near_scope", "out_of_scope")
    prompts = [{"prompt": f"{scope} question {i}?", "scope": scope} for scope in scopes for i in range(3)]
    write_jsonl(prompts, tmp_path / "prompts.jsonl")
    replies, statuses = [], []
    for with_ in ({}, {"batch_size": 1}, {"batch_size": 1, "device": "cpu"}):
        stage = {
            "name": "check",
            "uses": "evaluate_feedback",
            "inputs": {"prompts": str(tmp_path / "prompts.jsonl")},
            "with": {
                "feedback": "Start with Hi.",
                "metric": {"kind": "starts_with", "value": "Hi"},
                "conditions": ["base"],
                "engine": "hf",
                "sampling": {"max_new_tokens": 6, "temperature": 0.7},
                **with_,
            },
        }
        pipe = {"run_name": "check", "model": "tiny", "stages": [stage]}
        result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
        assert result.ok, [r.error for r in result.records]
        statuses.append(result.record("check").status)
        replies.append([r["response"] for r in load_rows(result.run_dir / "check" / "evaluation")])
    assert statuses == ["done", "done", "skipped"]  # batch_size reruns; the device does not
    assert replies[1] != replies[0]  # the same seed, other batches: other sampled replies
