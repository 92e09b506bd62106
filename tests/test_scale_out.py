"""Scale-out pieces that need no cluster: trainer settings, QLoRA on CPU (bitsandbytes' CPU
backend, tiny model), the vLLM/HF generation switch, and building Ray jobs from pipelines."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import subprocess
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import pipeline_from_dict
from pipeline.errors import HeedfulError
from pipeline.generation import (
    Completion,
    SamplingSettings,
    chat_generate,
    completions_from_vllm,
    generate_chat,
    pick_engine,
    vllm_sampling_kwargs,
    vllm_unavailable_reason,
)
from pipeline.records import write_jsonl
from pipeline.runner import Runner, _stage_gpus, _train_workers
from pipeline.stage import StageContext
from pipeline.training import TrainSettings

from .conftest import ROOT, heedful_cmd
from .test_dpo import toy_preferences

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _ctx(tmp_path) -> StageContext:
    return StageContext(
        name="align",
        uses="dpo",
        run_name="r",
        run_dir=tmp_path,
        work_dir=tmp_path,
        model="tiny",
        seed=0,
        inputs={},
        log=logging.getLogger("test"),
    )


# ----------------------------------------------------------------------------- settings


def test_single_worker_settings_add_nothing_new(tmp_path):
    kwargs = TrainSettings().trainer_kwargs(_ctx(tmp_path))
    assert not {"optim", "fsdp", "fsdp_config", "deepspeed"} & set(kwargs)
    assert TrainSettings(distributed={"strategy": "fsdp"}).trainer_kwargs(_ctx(tmp_path)).keys() == kwargs.keys()
    assert TrainSettings().num_workers == 1 and TrainSettings().use_gpu is None


def test_warmup_ratio_is_a_share_of_the_steps_up_to_all_of_them(tmp_path):
    """transformers reads a `warmup_steps` of 1 or more as a step count: a warmup_ratio of 1.0 still
    warms up over every step, not one."""
    from transformers import TrainingArguments

    for ratio, steps in ((0.0, 0), (0.1, 2), (0.5, 10), (1.0, 20)):
        kwargs = TrainSettings(warmup_ratio=ratio).trainer_kwargs(_ctx(tmp_path))
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", warmup_steps=kwargs["warmup_steps"])
        assert args.get_warmup_steps(20) == steps, ratio


def test_strategy_and_optimizer_switches(tmp_path):
    ctx = _ctx(tmp_path)
    fsdp = TrainSettings(num_workers=2, distributed={"strategy": "fsdp", "fsdp_config": {"version": 2}}).trainer_kwargs(ctx)
    assert fsdp["fsdp"] == "full_shard auto_wrap" and fsdp["fsdp_config"] == {"version": 2}
    assert "fsdp" not in TrainSettings(num_workers=2).trainer_kwargs(ctx)  # ddp: accelerate reads WORLD_SIZE
    assert TrainSettings(optim="paged_adamw_8bit").trainer_kwargs(ctx)["optim"] == "paged_adamw_8bit"
    assert TrainSettings(optim="adamw_8bit", trainer_args={"optim": "sgd"}).trainer_kwargs(ctx)["optim"] == "sgd"
    deepspeed = TrainSettings(num_workers=2, distributed={"strategy": "deepspeed", "zero_stage": 3})
    try:
        import deepspeed as _  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install deepspeed"):
            deepspeed.trainer_kwargs(ctx)
    else:
        assert deepspeed.trainer_kwargs(ctx)["deepspeed"]["zero_optimization"]["stage"] == 3
    assert TrainSettings(use_gpu=False).policy().device == "cpu"


def test_runner_gives_trainer_workers_the_resources(tmp_path):
    prefs = toy_preferences(tmp_path / "prefs.jsonl")
    stage = lambda extra: {"name": "align", "uses": "dpo", "inputs": {"preferences": str(prefs)}, "with": extra}  # noqa: E731
    data = {"run_name": "r", "model": "tiny", "stages": [stage({"num_workers": 3, "use_gpu": True})]}
    resolved = pipeline_from_dict(data, tmp_path).stages[0]
    assert _train_workers(resolved) == 3 and _stage_gpus(resolved) == 1.0
    plain = pipeline_from_dict({**data, "stages": [stage({})]}, tmp_path).stages[0]
    assert _train_workers(plain) == 1 and _stage_gpus(plain) == 0.0


# ----------------------------------------------------------------------------- QLoRA on CPU


def test_qlora_loads_a_frozen_4bit_base_on_cpu(tiny_model_path):
    from bitsandbytes.nn import Linear4bit

    from pipeline.models import device_policy, load_causal_lm

    model = load_causal_lm("tiny", device_policy("cpu"), qlora=True, trainable_adapter=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit) and q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.numel() * 32 == 64 * 64 * 4  # 4 bits per weight, packed into fp32 storage
    assert not any(p.requires_grad for p in model.parameters())  # prepare_model_for_kbit_training froze it
    assert model.model.norm.weight.dtype == torch.float32


def test_qlora_dpo_with_paged_8bit_optimizer_trains_on_cpu(tmp_path, tiny_model_path):
    from transformers import Trainer, TrainingArguments

    prefs = toy_preferences(tmp_path / "prefs.jsonl")
    settings = {
        "max_steps": 8,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "optim": "paged_adamw_8bit",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "qlora": True},
    }
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(
        TrainingArguments(**TrainSettings(**settings).trainer_kwargs(_ctx(tmp_path)))
    )
    assert optimizer_cls.__module__.startswith("bitsandbytes") and optimizer_kwargs.get("optim_bits") == 8
    data = {
        "run_name": "qlora",
        "model": "tiny",
        "stages": [{"name": "align", "uses": "dpo", "inputs": {"preferences": str(prefs)}, "with": settings}],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    curves = json.loads((result.run_dir / "align" / "curves.json").read_text())
    losses = [row["loss"] for row in curves if "loss" in row]
    assert abs(losses[0] - 0.6931) < 0.01 and losses[-1] < losses[0] - 0.05, losses

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)  # the adapter loads on the full-precision base
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, str(result.run_dir / "align" / "adapter"))(ids).logits
    assert (after - before).abs().max() > 1e-3


# ----------------------------------------------------------------------------- generation engines


def test_engine_switch_falls_back_to_hf_without_vllm_or_gpu():
    reason = vllm_unavailable_reason()
    if reason is None:
        pytest.skip("vLLM and a GPU are present: the fallback is not exercised here")
    assert pick_engine("hf") == "hf" and pick_engine("hf", device="cpu") == "hf"
    with pytest.raises(RuntimeError, match="engine: vllm cannot run"):
        pick_engine("vllm")
    # on CPU, auto is the CTranslate2 engine when it is installed (a core dependency), else HF
    assert pick_engine("auto", device="cpu") == ("ct2" if importlib.util.find_spec("ctranslate2") else "hf")


def test_generate_stage_engine_vllm_fails_clearly_where_it_cannot_run(tmp_path):
    if vllm_unavailable_reason() is None:
        pytest.skip("vLLM and a GPU are present")
    write_jsonl([{"prompt": "Hi"}], tmp_path / "p.jsonl")
    data = {
        "run_name": "eng",
        "model": "tiny",
        "stages": [
            {"name": "sample", "uses": "generate", "inputs": {"prompts": str(tmp_path / "p.jsonl")}, "with": {"engine": "vllm"}}
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert not result.ok and "engine: vllm cannot run" in str(result.record("sample").error)


def test_vllm_sampling_and_outputs_map_like_hf():
    greedy = vllm_sampling_kwargs(SamplingSettings(temperature=0, max_new_tokens=7), 1, 3, [2])
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1 and greedy["top_p"] == 1.0 and greedy["max_tokens"] == 7
    sampled = vllm_sampling_kwargs(SamplingSettings(temperature=0.7, top_k=0), 4, 3, [2, 5])
    assert sampled["n"] == 4 and sampled["top_k"] == -1 and sampled["stop_token_ids"] == [2, 5] and sampled["seed"] == 3
    # a stand-in shaped like vLLM's RequestOutput (vLLM itself needs a CUDA GPU)
    fake_request = SimpleNamespace(
        outputs=[
            SimpleNamespace(text=" Paris. ", token_ids=[11, 12, 2], finish_reason="stop"),
            SimpleNamespace(text="Par", token_ids=[11, 13], finish_reason="length"),
        ]
    )
    assert completions_from_vllm([fake_request], [2]) == [[Completion("Paris.", 2, True), Completion("Par", 2, False)]]


def test_generate_chat_hf_engine_matches_chat_generate(tiny_model_path):
    from pipeline.models import device_policy, load_causal_lm, load_tokenizer

    conversations = [[{"role": "user", "content": "Name a capital."}], [{"role": "user", "content": "Hi"}]]
    sampling = SamplingSettings(max_new_tokens=6, temperature=1.0)
    via_switch = generate_chat("tiny", conversations, sampling, num_samples=2, seed=7, engine="hf", device="cpu")
    model = load_causal_lm("tiny", device_policy("cpu")).eval()
    direct = chat_generate(model, load_tokenizer("tiny"), conversations, sampling, num_samples=2, seed=7)
    assert via_switch == direct and len(direct) == 2 and len(direct[0]) == 2


# ----------------------------------------------------------------------------- Ray jobs


def test_build_job_validates_and_uploads_the_project(tmp_path, monkeypatch):
    from ray_jobs.submit import build_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    from pipeline.config import load_pipeline

    align = next(s.name for s in load_pipeline(QUICKSTART).stages if s.spec.uses == "dpo")  # names may change
    beta = f"stages.{align}.with.beta=0.2"
    spec = build_job(
        QUICKSTART,
        ["model=tiny", beta],
        runs_dir=tmp_path / "runs",
        working_dir=ROOT,
        pip=["bitsandbytes"],
        env=["A=b=c"],
        force=[align],
    )
    argv = shlex.split(spec.entrypoint)
    assert argv[:4] == ["python", "-m", "ray_jobs.entrypoint", "configs/quickstart.yaml"]
    assert argv[argv.index("--runs-dir") + 1] == str((tmp_path / "runs").resolve())
    assert argv.count("--set") == 2 and beta in argv and argv[argv.index("--force") + 1] == align
    env = spec.runtime_env
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"] and env["pip"] == ["bitsandbytes"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["A"] == "b=c"
    assert "HF_TOKEN" not in env["env_vars"] and "hf_secret_value" not in json.dumps(env)
    assert spec.run_name == "quickstart" and spec.metadata["heedful_job_id"] == spec.job_id

    shared = build_job(QUICKSTART, [], runs_dir=tmp_path, working_dir=None)
    assert "working_dir" not in shared.runtime_env and "pip" not in shared.runtime_env
    assert shlex.split(shared.entrypoint)[3] == str(QUICKSTART)


def test_build_job_refuses_what_would_fail_on_the_cluster(tmp_path):
    from ray_jobs.submit import build_job

    outside = tmp_path / "p.yaml"
    outside.write_text(QUICKSTART.read_text())
    with pytest.raises(HeedfulError, match="outside the working dir"):
        build_job(outside, [], runs_dir=tmp_path, working_dir=ROOT)
    with pytest.raises(HeedfulError, match="--force nope"):
        build_job(QUICKSTART, [], runs_dir=tmp_path, working_dir=ROOT, force=["nope"])
    with pytest.raises(HeedfulError, match="KEY=VALUE"):
        build_job(QUICKSTART, [], runs_dir=tmp_path, working_dir=ROOT, env=["novalue"])


def test_submit_reports_config_errors_before_contacting_a_cluster(tmp_path):
    bad = tmp_path / "bad.yaml"
    write_jsonl([{"prompt": "x"}], tmp_path / "p.jsonl")
    bad.write_text(
        "run_name: x\nmodel: tiny\nstages:\n  - {name: s, uses: generate, inputs: {prompts: p.jsonl},"
        " with: {num_samples: many}}\n"
    )
    env = dict(os.environ, RAY_ADDRESS="http://127.0.0.1:9")  # nothing listens there
    proc = subprocess.run(
        heedful_cmd() + ["submit", str(bad), "--working-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bad.yaml:4" in proc.stdout and "num_samples" in proc.stdout


def test_entrypoint_refuses_to_run_outside_a_ray_job(monkeypatch, capsys):
    from ray_jobs.entrypoint import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["configs/quickstart.yaml", "--runs-dir", "/tmp/x"]) == 2
    assert "RAY_ADDRESS is not set" in capsys.readouterr().err


# ----------------------------------------------------------------------------- experiment tracking


def test_report_to_is_validated_and_checks_the_tracker_is_installed(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from pipeline.models import ModelUnavailable
    from pipeline.training import NON_SEMANTIC_TRAIN_FIELDS

    assert TrainSettings().trainer_kwargs(_ctx(tmp_path))["report_to"] == "none"
    assert TrainSettings(report_to="tensorboard").report_to == ["tensorboard"]
    assert "report_to" in NON_SEMANTIC_TRAIN_FIELDS
    with pytest.raises(ValidationError, match="report_to"):
        TrainSettings(report_to="neptune")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ModelUnavailable, match="pip install wandb"):
        TrainSettings(report_to=["wandb"]).trainer_kwargs(_ctx(tmp_path))


def test_tensorboard_logs_land_in_the_stage_folder_and_do_not_change_the_fingerprint(tmp_path, tiny_model_path):
    prefs = toy_preferences(tmp_path / "prefs.jsonl")

    def data(report_to):
        return {
            "run_name": "tracked",
            "model": "tiny",
            "stages": [
                {
                    "name": "align",
                    "uses": "dpo",
                    "inputs": {"preferences": str(prefs)},
                    "with": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 64, "report_to": report_to},
                }
            ],
        }

    result = Runner(pipeline_from_dict(data("tensorboard"), tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    events = list((result.run_dir / "align" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    again = Runner(pipeline_from_dict(data("none"), tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert [r.status for r in again.records] == ["skipped"]
