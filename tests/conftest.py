"""Shared fixtures. Unit tests use the `tiny` model and run stages in-process; tests
marked `slow` use SmolLM2-135M and real services (CI runs them too)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

# longest modules first under xdist (see tests/module_order.py)
pytest_plugins = ["tests.module_order"]

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# the comparisons with hand computations and TRL are fp32 ones; bf16 is tested on its own (test_precision.py)
os.environ["HEEDFUL_CPU_PRECISION"] = "fp32"

# the real datasets (qa-feedback, ClariQ, MemPrompt tasks) beside the checkout, or where HEEDFUL_SHARED_DATA says
SHARED_DATA = Path(os.environ.get("HEEDFUL_SHARED_DATA") or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session", autouse=True)
def conversions_of_this_session_removed(tmp_path_factory):
    """After the session, the CTranslate2 conversions of adapters it trained in its temporary
    folders go (SmolLM2: ~0.5 GB each); they could never be hit again. The base models'
    conversions stay for the next session. Conversions in isolated homes go with the folders."""
    yield
    from pipeline.ct2_cache import discard, entries
    from pipeline.paths import heedful_home

    ours = tmp_path_factory.getbasetemp().resolve()
    for entry in entries(heedful_home() / "ct2"):
        if entry.adapter is not None and entry.adapter.is_relative_to(ours):
            discard(entry.folder)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from pipeline.models import prepare_tiny

    return prepare_tiny()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from pipeline.models import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_model_path):
    """A tiny LoRA adapter with non-zero B (PEFT's default init would make it a no-op), on every linear
    layer with B ~ N(0, 1) (serving/local.py `random_lora_adapter`, seed 0): bare `tiny` (random, tied
    embeddings) greedily repeats the prompt's last token, the same for every chat prompt; this adapter
    makes greedy replies differ by prompt and token, so the engines' exactness tests compare something."""
    from serving.local import random_lora_adapter

    return random_lora_adapter(tmp_path_factory.mktemp("adapter") / "adapter", 0)


def tiny_variant(kind: str, **fields):
    """A seeded random 2-layer causal LM of another family with `tiny`'s tokenizer, built from its
    transformers config: "gemma2" (logit soft-capping), "granite" (logits divided by `logits_scaling`),
    "mistral" (a sliding attention window); `fields` set config fields."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import TINY_SHAPE, prepare_tiny

    tokenizer = AutoTokenizer.from_pretrained(prepare_tiny())
    config = AutoConfig.for_model(
        kind,
        vocab_size=len(tokenizer),
        **TINY_SHAPE,
        head_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def move_lora_b(model, seed: int = 3, scale: float = 0.05) -> None:
    """LoRA's B starts at zero (the adapter a no-op, policy == reference): set it to small random
    values so a loss against the base and both LoRA factors' gradients are non-trivial."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def isolated_home(path: Path) -> Path:
    """A fresh HEEDFUL_HOME (its own logs, LLM cache, Argilla state) that shares the prepared models.

    Why share them: a CLI process in an empty home converts SmolLM2's GGUF and builds `tiny`
    again before it does anything (~20 s of CPU each time, issue 15), which is not what the
    tests that isolate their home are about. Idempotent: a test may call it per command."""
    from pipeline.paths import heedful_home

    path.mkdir(parents=True, exist_ok=True)
    models = path / "models"
    if not models.exists():
        models.symlink_to(heedful_home() / "models", target_is_directory=True)
    return path


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_pipeline(prompts: Path | str = "data:quickstart/prompts.jsonl", **stage_overrides) -> dict:
    """The quickstart's shape, sized for the tiny model (seconds per run)."""
    stages = {
        "sample": {
            "name": "sample",
            "uses": "generate",
            "inputs": {"prompts": str(prompts)},
            "with": {"num_samples": 2, "max_prompts": 6, "sampling": {"max_new_tokens": 8, "temperature": 1.0}},
        },
        "pairs": {
            "name": "pairs",
            "uses": "make_pairs",
            "inputs": {"responses": "sample.responses"},
            "with": {"min_margin": 0.0},
        },
        "align": {
            "name": "align",
            "uses": "dpo",
            "inputs": {"preferences": "pairs.preferences"},
            "with": {
                "max_steps": 2,
                "per_device_train_batch_size": 2,
                "max_length": 64,
                "save_steps": 1,
                "lora": {"r": 4, "alpha": 8},
            },
        },
        "ship": {"name": "ship", "uses": "export", "inputs": {"adapter": "align.adapter"}},
    }
    for name, override in stage_overrides.items():
        stages[name]["with"] = {**stages[name].get("with", {}), **override}
    return {"run_name": "t", "model": "tiny", "seed": 0, "stages": list(stages.values())}


@pytest.fixture
def cli_env(tmp_path) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def heedful_cmd() -> list[str]:
    return [sys.executable, "-m", "pipeline.cli"]
