"""PPO on the real SmolLM2-135M (slow): real EOS handling and chat template, the reference
is the base itself at step 1, and a dense rule reward flows through the `ppo` stage."""

from __future__ import annotations

import json

import pytest

from pipeline.config import pipeline_from_dict
from pipeline.runner import Runner

pytestmark = pytest.mark.slow


def test_ppo_stage_on_smollm2_samples_finished_replies_and_stays_near_the_base(tmp_path, smollm2_path):
    data = {
        "run_name": "ppo-smollm2",
        "model": "smollm2-135m",
        "seed": 0,
        "stages": [
            {
                "name": "rl",
                "uses": "ppo",
                "inputs": {"prompts": "data:quickstart/prompts.jsonl", "eval_prompts": "data:quickstart/prompts.jsonl"},
                "with": {
                    "steps": 2,
                    "prompts_per_step": 2,
                    "samples_per_prompt": 2,
                    "max_new_tokens": 24,
                    "ppo_epochs": 2,
                    "mini_batch_size": 2,
                    "eval_prompts": 2,
                    "eval_every": 2,
                    "max_prompts": 6,
                    "objectives": [{"rule": {"rule": "prompt_overlap"}}],
                },
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    curves = json.loads((result.run_dir / "rl" / "curves.json").read_text())
    assert curves[1]["kl"] == 0.0  # the first rollout's policy is the base (LoRA B = 0)
    assert 0 <= curves[2]["kl"] < 1.0  # two small updates: still near the base
    assert all(0 < row["response/length"] <= 24 for row in curves[1:])

    from pipeline.records import load_rows

    samples = load_rows(result.run_dir / "rl" / "samples")
    first = [s for s in samples if s["step"] == 0]
    assert len(first) == 2 and all(s["response"].strip() for s in first)
    assert any(s["finished"] for s in samples) or all(s["num_tokens"] == 24 for s in samples)
    assert all("<|im_end|>" not in s["response"] for s in samples)  # the EOS is an action, not text
