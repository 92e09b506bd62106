"""A Chain-of-Hindsight adapter answers after its phrase wherever heedful samples from it: the
generation engines (HF and CTranslate2, as the generate and simulate stages and evaluation hold
them), the LLM client, `heedful serve` (batched, alone, streamed) and the generate stage; and its
exported model card says how to prompt it.

The reference is HF generate on the adapter after the phrase, cut at the stop phrases (what
evaluation measured). The fixture checks that the phrase changes `tiny`'s greedy replies under the
random adapter and that the stop phrase cuts one, so an engine that ignored either would differ."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from pipeline.generation import SamplingSettings

PHRASE = "A helpful answer:"
PROMPTS = ["How do I sear a steak?", "What knife for tomatoes?", "Is basil a herb?"]
GREEDY = SamplingSettings(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def coh(tmp_path_factory, lora_adapter):
    """(a CoH adapter folder, the conversations, each one's expected reply, the replies without the phrase)."""
    from pipeline.chat import as_messages
    from pipeline.hindsight import COH_FILE, Phrase
    from pipeline.models import load_causal_lm, load_tokenizer
    from trainers.feedback_eval import sample_completions

    adapter = tmp_path_factory.mktemp("coh") / "adapter"
    shutil.copytree(lora_adapter, adapter)
    model, tokenizer = load_causal_lm("tiny", adapter=adapter).eval(), load_tokenizer("tiny")
    conversations = [as_messages(p) for p in PROMPTS]
    plain = [c.text for c in sample_completions(model, tokenizer, conversations, GREEDY, 8, 0)]
    whole = [c.text for c in sample_completions(model, tokenizer, conversations, GREEDY, 8, 0, Phrase(PHRASE))]
    assert whole != plain  # the phrase changes what the adapter writes
    words = whole[0].split()
    assert len(words) >= 4, whole
    phrase = Phrase(PHRASE, (" ".join(words[2:4]), "An unhelpful answer:"))  # a stop from the middle of a reply
    (adapter / COH_FILE).write_text(json.dumps({"phrase": phrase.text, "stop": list(phrase.stop)}))
    expected = [phrase.cut(w)[0] for w in whole]
    assert expected[0] and expected[0] != whole[0]  # the stop phrase cuts the first reply
    return adapter, conversations, expected, plain


@pytest.mark.parametrize("engine", ["hf", "ct2"])
def test_the_generation_engine_and_the_llm_client_answer_after_the_phrase(coh, engine):
    from pipeline.generation import LocalEngine
    from pipeline.llm import HFClient

    adapter, conversations, expected, _ = coh
    local = LocalEngine("tiny", adapter, engine)
    replies = [r[0] for r in local.generate(conversations, GREEDY, batch_size=2)]
    assert [r.text for r in replies] == expected
    # the reply cut at a phrase ended its answer: finished, its tokens those of the text kept
    tokenizer = local.ct2.tokenizer if engine == "ct2" else local.tokenizer
    assert replies[0].finished and replies[0].num_tokens == len(tokenizer.encode(expected[0], add_special_tokens=False))
    client = HFClient("tiny", batch_size=2, adapter=adapter, engine=engine)
    assert [c.text for c in client.generate(conversations, GREEDY)] == expected
    assert client.identity.endswith("+coh")  # replies cached without the phrase are not reused
    if engine == "hf":  # a client handed the loaded model (c3po_data's generator that is the policy), told its adapter
        from pipeline.llm import LLMSettings, build_client

        shared = build_client(LLMSettings(), "tiny", model=local.model, tokenizer=local.tokenizer, model_adapter=adapter)
        assert [c.text for c in shared.generate(conversations, GREEDY)] == expected


@pytest.mark.parametrize("engine", ["hf", "ct2"])
def test_serve_answers_after_the_phrase_batched_alone_and_streamed(coh, engine):
    from serving.engine import ChatEngine, Generated

    adapter, conversations, expected, _ = coh
    served = ChatEngine("tiny", adapter, engine=engine, max_batch=4, batch_window=0.5)
    try:
        batched: dict[int, Generated] = {}

        def ask(i: int) -> None:
            batched[i] = served.generate(conversations[i], max_tokens=GREEDY.max_new_tokens)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(conversations))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together = [batched[i] for i in range(len(conversations))]
        assert [g.text for g in together] == expected
        assert together[0].finish_reason == "stop"  # cut at a phrase, as at a stop string
        alone = [served.generate(c, max_tokens=GREEDY.max_new_tokens, stop=["\x00never"]) for c in conversations]
        assert [g.text for g in alone] == expected and alone[0].finish_reason == "stop"
        # a batch counts the tokens through the phrase, as a request alone stops there
        assert [g.completion_tokens for g in together] == [g.completion_tokens for g in alone]
        assert alone[0].completion_tokens < GREEDY.max_new_tokens
        for i in range(len(conversations)):
            _, deltas, info = served.stream(conversations[i], max_tokens=GREEDY.max_new_tokens)
            assert "".join(deltas) == expected[i]
            assert (info["finish_reason"], info["completion_tokens"]) == (alone[i].finish_reason, alone[i].completion_tokens)
    finally:
        served.close()


def test_ctranslate2_ends_a_batch_row_at_the_token_that_completes_a_stop_string(coh):
    """How a served micro-batch on CTranslate2 stops at a CoH phrase: the row that meets it leaves the
    batch after that token; the others write what they write without stop strings."""
    from pipeline.chat import render_many
    from pipeline.ct2_engine import Ct2Generator
    from pipeline.hindsight import adapter_phrase

    adapter, conversations, _, _ = coh
    phrase = adapter_phrase(adapter)
    assert phrase is not None
    generator = Ct2Generator("tiny", adapter)
    prompts = [text + phrase.text for text in render_many(generator.tokenizer, conversations)]
    budgets = [GREEDY.max_new_tokens] * len(prompts)
    whole = generator.generate_ids(prompts, GREEDY, seed=None, max_new_tokens=budgets)
    stopped = generator.generate_ids(prompts, GREEDY, seed=None, max_new_tokens=budgets, stop_strings=list(phrase.stop))

    def text(ids: list[int]) -> str:
        return generator.tokenizer.decode(ids, skip_special_tokens=True)

    first = stopped[0][0]
    assert len(first) < len(whole[0][0]) and first == whole[0][0][: len(first)]
    assert phrase.cut(text(first))[1] and not phrase.cut(text(first[:-1]))[1]  # the last token completes it
    for (ids,), (full,) in zip(stopped, whole):
        assert ids == full or phrase.cut(text(ids))[1]


def test_the_generate_stage_samples_after_the_phrase(coh, tmp_path):
    from pipeline.config import pipeline_from_dict
    from pipeline.records import load_rows
    from pipeline.runner import Runner

    adapter, _, expected, _ = coh
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    with_ = {"num_samples": 1, "sampling": GREEDY.model_dump(), "engine": "ct2"}
    pipe = {
        "run_name": "gen",
        "model": "tiny",
        "stages": [
            {"name": "sample", "uses": "generate", "inputs": {"prompts": str(prompts), "adapter": str(adapter)}, "with": with_}
        ],
    }
    result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, result.records[0].error
    assert [r["response"] for r in load_rows(result.run_dir / "sample" / "responses")] == expected


@pytest.mark.parametrize("engine", ["hf", "ct2"])
def test_c3po_data_baselines_from_a_coh_adapter_answer_after_the_phrase(coh, tmp_path, engine):
    """The current model's baselines, on the loaded HF model or on CTranslate2 (template reviser: no generator)."""
    from pipeline.config import pipeline_from_dict
    from pipeline.records import load_rows
    from pipeline.runner import Runner

    adapter, _, expected, _ = coh
    prompts = tmp_path / "prompts.jsonl"
    scopes = ["in_scope", "near_scope", "out_of_scope"]
    prompts.write_text("".join(json.dumps({"prompt": p, "scope": s, "split": "train"}) + "\n" for p, s in zip(PROMPTS, scopes)))
    with_ = {
        "feedback": "Start with a tip.",
        "reviser": "template",
        "revision_template": "Tip: {response}",
        "baseline_sampling": GREEDY.model_dump(),
        "engine": engine,
    }
    stage = {"name": "data", "uses": "c3po_data", "inputs": {"prompts": str(prompts), "adapter": str(adapter)}, "with": with_}
    pipe = {"run_name": "c3", "model": "tiny", "stages": [stage]}
    result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, result.records[0].error
    baselines = {r["prompt"]: r["baseline"] for r in load_rows(result.run_dir / "data" / "train")}
    assert [baselines[p] for p in PROMPTS] == expected


def test_an_exported_coh_adapter_says_how_to_prompt_it_and_a_bad_coh_json_is_named(coh, tmp_path):
    from pipeline.export import export_adapter
    from pipeline.hindsight import COH_FILE, Phrase, adapter_phrase

    adapter = coh[0]
    package = export_adapter(adapter, tmp_path / "package", lineage={"base_model": {"name": "tiny"}})
    card = (package / "README.md").read_text()
    assert f"answers after the phrase `{PHRASE}`" in card and "`An unhelpful answer:`" in card
    assert adapter_phrase(package) == adapter_phrase(adapter)  # coh.json travels with the package

    # the served version id follows the phrase: the same weights answer differently with another one
    from serving.versions import adapter_version_id

    ids = {adapter_version_id(package)}
    (package / COH_FILE).write_text(json.dumps({"phrase": "A good answer:", "stop": []}))
    ids.add(adapter_version_id(package))
    (package / COH_FILE).unlink()
    ids.add(adapter_version_id(package))
    assert len(ids) == 3

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / COH_FILE).write_text(json.dumps({"phrase": ["A helpful answer:"]}))
    with pytest.raises(ValueError, match=r"bad/coh\.json: field 'phrase' must be a string"):
        adapter_phrase(bad)
    assert adapter_version_id(bad).startswith("adp-")  # still a version id (trace lists every folder); deploy refuses it
    (bad / COH_FILE).write_text(json.dumps({"phrase": PHRASE, "stop": ["", "An unhelpful answer:"]}))
    assert adapter_phrase(bad) == Phrase(PHRASE, ("An unhelpful answer:",))  # an empty stop would end every reply
