"""The simulator behind an OpenAI-compatible endpoint: a real HTTP server (tests/openai_test_server.py)."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.config import pipeline_from_dict
from pipeline.llm import LLMSettings, OpenAIClient
from pipeline.records import load_rows, write_jsonl
from pipeline.runner import Runner

from .openai_test_server import serve
from .test_simulate import NEEDS, check_turn_order


def key_file(tmp_path, key="sk-test-123", mode=0o600):
    path = tmp_path / "simulator.key"
    path.write_text(key + "\n")
    os.chmod(path, mode)
    return path


def test_simulate_through_an_openai_compatible_server(tmp_path, tiny_model_path, caplog):
    key = key_file(tmp_path)
    needs = tmp_path / "needs.jsonl"
    write_jsonl(NEEDS, needs)
    with serve("tiny", "sk-test-123") as (base_url, stats):
        spec = {
            "run_name": "sim-openai",
            "model": "tiny",
            "seed": 1,
            "stages": [
                {
                    "name": "users",
                    "uses": "simulate",
                    "inputs": {"conversations": str(needs)},
                    "with": {
                        "max_rounds": 2,
                        "satisfied_threshold": 1.0,
                        "cache_path": str(tmp_path / "cache.sqlite"),
                        "simulator": {
                            "backend": "openai",
                            "base_url": base_url,
                            "model": "tiny",
                            "api_key_file": str(key),
                            "concurrency": 3,
                        },
                        "policy_sampling": {"max_new_tokens": 6},
                        "user_sampling": {"max_new_tokens": 6},
                    },
                }
            ],
        }
        result = Runner(pipeline_from_dict(spec, tmp_path), tmp_path / "runs", use_ray=False).execute()
        assert result.ok, [r.error for r in result.records]
        # 10 calibration judgments, then 3 users x 2 rounds of one judgment (logprobs) and one
        # feedback each; the policy is local
        assert stats["logprob_requests"] == 10 + 6 and stats["requests"] == 10 + 12
        stage = result.run_dir / "users"
        for t in load_rows(stage / "transcripts"):
            check_turn_order(t["utterances"])
            assert t["rounds"] == 2
        feedback = load_rows(stage / "verbal_feedback")
        prov = feedback[0]["provenance"]
        assert prov["annotator"] == f"convsim:openai:{base_url}:tiny"
        assert json.loads(prov["extra"])["simulator_model"] == f"openai:{base_url}:tiny"
        assert "sk-test-123" not in (tmp_path / "runs" / "sim-openai" / "logs" / "users.log").read_text()
        assert "sk-test-123" not in json.dumps(json.loads((stage / "manifest.json").read_text()))

        # a rerun is served from the cache: the server sees no new request
        again = Runner(pipeline_from_dict(spec, tmp_path), tmp_path / "runs", use_ray=False, force={"users"}).execute()
        assert again.ok and stats["requests"] == 22

        # the wrong key is refused by the server, and the error says so
        (tmp_path / "bad").mkdir()
        bad = OpenAIClient(
            LLMSettings(kind="openai", base_url=base_url, model="tiny", api_key_file=str(key_file(tmp_path / "bad", "sk-wrong")))
        )
        with pytest.raises(Exception, match="401|invalid api key"):
            bad.yes_probability([[{"role": "user", "content": "hi"}]])
