"""The CPU's precision (pipeline/precision.py): fp32 without bf16 units, bf16 where they pay, and
the pipeline working end to end in bf16 (the rest of the suite pins fp32: tests/conftest.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline import precision
from tests.conftest import tiny_pipeline
from trainers.fastpref import ref_cache

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_variable_answers_and_a_bad_value_names_it(monkeypatch, tmp_path):
    for value, expected in (("fp32", "float32"), ("BF16", "bfloat16"), ("bfloat16", "bfloat16"), (" auto ", None), ("", None)):
        monkeypatch.setenv(precision.ENV, value)
        assert precision.forced_precision() == expected
    monkeypatch.setenv(precision.ENV, "fp16")
    with pytest.raises(ValueError, match="HEEDFUL_CPU_PRECISION='fp16'"):
        precision.forced_precision()
    monkeypatch.setenv(precision.ENV, "bf16")
    # forced: nothing measured, nothing cached
    assert precision.cpu_precision(cache_path=tmp_path / "p.json") == "bfloat16"
    assert not (tmp_path / "p.json").exists()


def test_bf16_units_are_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 fma\n")
    assert precision.has_bf16_units(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n")
    assert precision.has_bf16_units(cpuinfo)
    # avx512_bf16's name inside another flag is not the flag; no flags line, no file: no units
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni xavx512_bf16x\n")
    assert not precision.has_bf16_units(cpuinfo)
    cpuinfo.write_text("processor\t: 0\n")
    assert not precision.has_bf16_units(cpuinfo)
    assert not precision.has_bf16_units(tmp_path / "missing")


def test_auto_keeps_fp32_without_units_and_measures_once_with_them(monkeypatch, tmp_path):
    monkeypatch.delenv(precision.ENV, raising=False)
    cache = tmp_path / "precision_probe.json"
    measured = []

    def timings(fp32: float, bf16: float):
        def measure():
            measured.append((fp32, bf16))
            return {"float32": fp32, "bfloat16": bf16}

        return measure

    # no bf16 units: fp32 without measuring (emulated bf16 is ~13x slower)
    monkeypatch.setattr(precision, "has_bf16_units", lambda: False)
    monkeypatch.setattr(precision, "_measure", timings(1.0, 0.1))
    assert precision.cpu_precision(cache_path=cache) == "float32"
    assert measured == [] and not cache.exists()
    # units that pay (2x): bf16, measured once, then read from the cache
    monkeypatch.setattr(precision, "has_bf16_units", lambda: True)
    monkeypatch.setattr(precision, "_measure", timings(1.0, 0.5))
    assert precision.known_cpu_precision(cache_path=cache) is None
    assert precision.cpu_precision(cache_path=cache) == "bfloat16"
    assert precision.cpu_precision(cache_path=cache) == "bfloat16"
    assert measured == [(1.0, 0.5)]
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["precision"] == "bfloat16" and entry["bf16_vs_fp32"] == 2.0
    # units that do not pay enough (1.25x < MARGIN): fp32, on a host with no answer yet
    other = tmp_path / "other.json"
    monkeypatch.setattr(precision, "_measure", timings(1.0, 0.8))
    assert precision.cpu_precision(cache_path=other) == "float32"
    assert precision.known_cpu_precision(cache_path=other) == "float32"


def test_the_probe_times_both_dtypes_for_real():
    seconds = precision._measure(repeats=2)
    assert set(seconds) == {"float32", "bfloat16"} and all(s > 0 for s in seconds.values())


def test_a_bad_precision_argument_is_a_clear_error():
    from pipeline.models import device_policy

    assert device_policy("cpu", precision="fp32").dtype_name == "float32"
    with pytest.raises(ValueError, match="CPU precision 'half'"):
        device_policy("cpu", precision="half")


def test_the_device_policy_follows_the_host_and_a_conversion_can_insist_on_fp32(monkeypatch):
    from pipeline.models import device_policy

    monkeypatch.setenv(precision.ENV, "bf16")
    policy = device_policy("cpu")
    assert policy.dtype == torch.bfloat16
    assert policy.trainer_kwargs()["bf16"] is True and policy.trainer_kwargs()["use_cpu"] is True
    assert device_policy("cpu", precision="float32").dtype == torch.float32
    monkeypatch.setenv(precision.ENV, "fp32")
    assert device_policy("cpu").dtype == torch.float32 and device_policy("cpu").trainer_kwargs()["bf16"] is False


def test_chunked_logps_in_bf16_keep_the_frozen_heads_gradient():
    """Under bf16 the frozen head's E_p[W] product runs in bf16 (fp32 accumulation), not on an fp32
    copy of the head: the gradient stays that of the bf16 logits, within bf16's rounding."""
    from trainers.fastpref.logps import ChunkedLogps

    gen = torch.Generator().manual_seed(2)
    hidden = (torch.randn(29, 32, generator=gen) * 2).bfloat16().requires_grad_(True)
    weight = (torch.randn(211, 32, generator=gen) * 0.5).bfloat16()
    targets = torch.randint(0, 211, (29,), generator=gen)
    upstream = torch.randn(29, generator=gen)
    logp, *_ = ChunkedLogps.apply(hidden, weight, None, targets, 7 * 211, True, True)
    assert logp.grad_fn is not None and len(logp.grad_fn.saved_tensors) == 1  # the frozen-head path
    (logp * upstream).sum().backward()
    # in float64 from the same bf16 logits: logp = z[t] - logsumexp(z), d logp / dh = W[t] - softmax(z) @ W
    logits = (hidden.detach() @ weight.t()).double()
    full = torch.log_softmax(logits, -1)
    w = weight.double()
    expected = (w[targets] - full.exp() @ w) * upstream.double()[:, None]
    torch.testing.assert_close(logp.double(), full.gather(1, targets[:, None])[:, 0], atol=1e-3, rtol=0)
    # bf16 probabilities in the product: ~2^-8 relative
    torch.testing.assert_close(hidden.grad.double(), expected, atol=1e-2 * expected.abs().max().item(), rtol=0)


def test_the_quickstarts_shape_runs_in_bf16_and_the_policy_learns(monkeypatch, tmp_path, tiny_model_path):
    """generate -> pairs -> dpo -> export with the CPU set to bf16: weights loaded in bf16, the DPO
    step under bf16 autocast, each stage's manifest saying so, and DPO's loss falling."""
    from pipeline.config import pipeline_from_dict
    from pipeline.records import load_rows
    from pipeline.runner import Runner

    monkeypatch.setenv(precision.ENV, "bf16")
    # a cold reference cache: the reference is computed here, by this code (as a first run computes it)
    monkeypatch.setattr(ref_cache, "default_root", lambda: tmp_path / "ref_logps")
    data = tiny_pipeline(align={"max_steps": 6, "learning_rate": 5e-3, "gradient_checkpointing": False, "save_steps": 100})
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    for stage in ("sample", "align"):
        manifest = json.loads((result.run_dir / stage / "manifest.json").read_text())
        assert manifest["host"]["cpu_precision"] == "bfloat16"
    replies = load_rows(result.run_dir / "sample" / "responses")
    assert len(replies) == 12 and all(isinstance(r["response"], str) for r in replies)
    curves = json.loads((result.run_dir / "align" / "curves.json").read_text())
    losses = [row["loss"] for row in curves if "loss" in row]
    assert len(losses) == 6 and all(loss == loss for loss in losses)  # no NaN
    # the untrained adapter is the reference, computed alike (the same attention route): log 2 exactly
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and curves[0]["rewards/margins"] == 0
    assert sum(losses[-2:]) < sum(losses[:2])
    assert (result.run_dir / "ship" / "package" / "adapter_model.safetensors").exists()


def test_a_merged_export_is_fp32_on_a_bf16_cpu(monkeypatch, tmp_path, lora_adapter):
    """Merging in bf16 would round away much of a small LoRA change: merged weights stay fp32."""
    from safetensors.torch import load_file

    from pipeline.export import _write_merged

    monkeypatch.setenv(precision.ENV, "bf16")
    _write_merged(lora_adapter, tmp_path / "merged", {"name": "tiny"})
    weights = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
