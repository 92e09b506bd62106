"""The quickstart under local Ray on SmolLM2-135M, through the CLI, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch

from .conftest import ROOT, heedful_cmd

pytestmark = pytest.mark.slow


def heedful(*args, timeout=1500):
    return subprocess.run(heedful_cmd() + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_quickstart_under_ray(tmp_path, smollm2_path):
    runs = tmp_path / "runs"
    overrides = ["--set", "stages.align.with.max_steps=2", "--set", "stages.sample.with.max_prompts=8"]
    proc = heedful("run", "configs/quickstart.yaml", "--runs-dir", str(runs), *overrides)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "(stage:align" in proc.stdout + proc.stderr  # logs came back from the Ray worker, named
    run_dir = runs / "quickstart"
    package = run_dir / "ship" / "package"
    assert (package / "adapter_model.safetensors").is_file() and (package / "README.md").is_file()
    lineage = json.loads((package / "heedful.json").read_text())
    assert lineage["base_model"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [s["name"] for s in lineage["stages"]] == ["sample", "pairs", "align"]
    assert lineage["feedback_counts"]["preferences"] >= 1
    assert (run_dir / "report.html").read_text().count("<img") >= 1

    started = time.time()
    again = heedful("run", "configs/quickstart.yaml", "--runs-dir", str(runs), *overrides)
    assert again.returncode == 0
    assert again.stdout.count("up to date") == 4
    assert time.time() - started < 30

    status = heedful("status", "quickstart", "--runs-dir", str(runs))
    assert status.returncode == 0 and "skipped" in status.stdout and "align" in status.stdout

    out = tmp_path / "shipped"
    exported = heedful("export", "quickstart", "--to", str(out), "--runs-dir", str(runs))
    assert exported.returncode == 0, exported.stdout + exported.stderr

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_path)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 47]])
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
        tuned_logits = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-4
