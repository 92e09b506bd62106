"""pipeline/llm.py: one client, one key policy, one temperature-0 behaviour, both config spellings.

The endpoint is the real local OpenAI-compatible server of tests/openai_test_server.py (the
`tiny` model behind FastAPI); the local client is the real `tiny` model.
"""

from __future__ import annotations

import logging
import os

import pytest
from pydantic import ValidationError

from pipeline.generation import SamplingSettings
from pipeline.llm import DEPRECATED_API_KEY_ENV, HFClient, LLMSettings, OpenAIClient, api_key, build_client, read_key_file

from .openai_test_server import serve


def secret(path, text="sk-test-123", mode=0o600):
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def test_both_old_spellings_map_to_kind():
    assert LLMSettings(backend="openai", model="m").kind == "openai"  # the simulator's spelling
    assert LLMSettings(kind="local").kind == "hf"  # the generators' spelling
    assert LLMSettings.model_validate({"backend": "hf", "kind": "local"}).kind == "hf"
    with pytest.raises(ValidationError, match="not both"):
        LLMSettings.model_validate({"backend": "openai", "kind": "local"})
    with pytest.raises(ValidationError, match="expected hf or openai"):
        LLMSettings(kind="vllm")
    with pytest.raises(ValidationError, match="needs model"):
        LLMSettings(kind="openai")


def test_stage_configs_accept_the_old_spellings():
    from stages.c3po_data import C3poDataConfig
    from stages.simulate import SimulateConfig

    assert (
        SimulateConfig(simulator={"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"}).simulator.kind
        == "openai"
    )
    assert SimulateConfig().simulator.model == "smollm2-135m"  # the simulator's default model is kept
    assert SimulateConfig(simulator={"backend": "hf"}).simulator.model == "smollm2-135m"
    assert C3poDataConfig(feedback="Be brief.", generator={"kind": "local"}).generator.kind == "hf"


def test_key_file_must_be_private(tmp_path, caplog):
    assert read_key_file(secret(tmp_path / "ok.key")) == "sk-test-123"
    with pytest.raises(ValueError, match="readable by others; chmod 600"):
        read_key_file(secret(tmp_path / "loose.key", mode=0o644))
    with pytest.raises(ValueError, match="not found"):
        read_key_file(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="empty"):
        read_key_file(secret(tmp_path / "empty.key", ""))
    assert "sk-test-123" not in caplog.text


def test_key_precedence_file_then_env_then_deprecated_env(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv(DEPRECATED_API_KEY_ENV, raising=False)
    settings = LLMSettings(kind="openai", model="m")
    assert api_key(settings) == "not-needed"
    monkeypatch.setenv(DEPRECATED_API_KEY_ENV, "sk-old")
    with caplog.at_level(logging.WARNING, logger="heedful.llm"):
        assert api_key(settings) == "sk-old"
    assert "deprecated" in caplog.text and "sk-old" not in caplog.text
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert api_key(settings) == "sk-env"
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert api_key(settings.model_copy(update={"api_key_env": "MY_KEY"})) == "sk-mine"
    file_settings = settings.model_copy(update={"api_key_file": str(secret(tmp_path / "k"))})
    assert api_key(file_settings) == "sk-test-123"


def test_temperature_zero_is_greedy_on_both_kinds(tiny_model_path, tmp_path, lora_adapter):
    """At temperature 0 the endpoint gets temperature 0 and no top_p, and answers what the
    local client's greedy decoding answers for the same model. With an adapter on both sides: bare
    `tiny`'s greedy reply is the same empty text for every prompt, so a reply from another model or
    prompt would not show."""
    conversation = [[{"role": "user", "content": "Name a colour."}]]
    greedy = SamplingSettings(max_new_tokens=5, temperature=0.0)
    local = HFClient("tiny", adapter=lora_adapter, engine="hf")
    with serve("tiny", "sk-test-123", adapter=lora_adapter) as (base_url, stats):
        settings = LLMSettings(kind="openai", base_url=base_url, model="tiny", api_key_file=str(secret(tmp_path / "k")))
        remote = build_client(settings)
        assert isinstance(remote, OpenAIClient) and remote.identity == f"openai:{base_url}:tiny" and remote.name == "tiny"
        text = remote.generate(conversation, greedy, seed=3)[0].text
        assert stats["sampling"][-1] == {"temperature": 0.0}
        remote.generate(conversation, SamplingSettings(max_new_tokens=5, temperature=0.7, top_p=0.9))
        assert stats["sampling"][-1] == {"temperature": 0.7, "top_p": 0.9}
    assert text and text == local.generate(conversation, greedy, seed=11)[0].text.strip()
    assert text != HFClient("tiny", engine="hf").generate(conversation, greedy)[0].text.strip()  # the adapter's own reply


def test_local_client_reuses_a_loaded_model_only_when_it_is_the_same(tiny_model_path, lora_adapter):
    first = HFClient("tiny", adapter=lora_adapter)  # bare tiny's greedy chat replies are all blank
    short = {"max_new_tokens": 4, "temperature": 0.0}
    same = build_client(LLMSettings(sampling=short), "tiny", model=first.model, tokenizer=first.tokenizer)
    assert same.model is first.model and same.identity == "hf:tiny"
    asked = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "Why is the sky blue?"}]]
    texts = same.complete(asked)
    assert texts == [c.text for c in first.generate(asked, SamplingSettings(**short))]
    assert all(texts) and texts[0] != texts[1]  # real replies, not the same blank for both
    other = build_client(LLMSettings(model="tiny", adapter=None), "smollm2-135m", model=first.model)
    assert other.model is not first.model  # a different name: it loads its own


def test_a_loaded_model_is_shared_only_with_a_client_of_that_model_without_adapter():
    """The simulate stage asks before it loads the policy's HF model for its simulator (a policy on
    CTranslate2 has none loaded): only a local client of the same model, without adapter, reuses it."""
    from pipeline.llm import shares_default_model

    assert shares_default_model(LLMSettings(), "tiny")  # no model named: the pipeline's
    assert shares_default_model(LLMSettings(model="tiny"), "tiny")
    assert not shares_default_model(LLMSettings(model="smollm2-135m"), "tiny")
    assert not shares_default_model(LLMSettings(model="tiny", adapter="a"), "tiny")
    assert not shares_default_model(LLMSettings(kind="openai", model="tiny"), "tiny")
