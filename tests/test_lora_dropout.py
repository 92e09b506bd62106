"""LoRA dropout with a fast CPU mask (trainers/lora_dropout.py) is dropout: the kept fraction
and the output's mean match p, the gradient is the mask times the scale, a seed repeats it,
eval mode is the identity, and the trainers get it on every LoRA layer (not on p = 0)."""

from __future__ import annotations

import pytest
import torch

from trainers.lora_dropout import LEVELS, CpuDropout, keep_mask, use_cpu_lora_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_kept_fraction_and_scale_match_p(p):
    n = 2_000_000
    torch.manual_seed(0)
    keep, scale = keep_mask((n,), p)
    rounded = round(p * LEVELS) / LEVELS
    assert abs(rounded - p) <= 0.5 / LEVELS
    assert scale == pytest.approx(1 / (1 - rounded), rel=1e-12)
    sd = (rounded * (1 - rounded) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - rounded)) < 5 * sd
    # the output's expectation is the input: kept fraction x scale = 1
    assert keep.float().mean().item() * scale == pytest.approx(1.0, abs=5 * sd * scale)


def test_mask_elements_are_independent_of_their_neighbours():
    """16 random bits per element: adjacent elements (the same 64-bit word) are not correlated."""
    torch.manual_seed(1)
    keep, _ = keep_mask((1_000_000,), 0.5)
    k = keep.float()
    corr = torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1].item()
    assert abs(corr) < 0.01


def test_torch_seed_repeats_the_mask():
    torch.manual_seed(5)
    a, _ = keep_mask((4, 33, 17), 0.3)
    torch.manual_seed(5)
    b, _ = keep_mask((4, 33, 17), 0.3)
    c, _ = keep_mask((4, 33, 17), 0.3)
    assert a.shape == (4, 33, 17) and a.dtype == torch.bool
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_forward_and_gradient_are_mask_times_scale():
    drop = CpuDropout(0.2)
    x = torch.randn(8, 300, requires_grad=True)
    torch.manual_seed(2)
    y = drop(x)
    torch.manual_seed(2)
    keep, scale = keep_mask(x.shape, 0.2)
    assert torch.equal(y, torch.where(keep, x, 0.0) * scale)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g * keep * scale)
    assert 0 < (y == 0).float().mean().item() < 0.3


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(5, 7)
    assert torch.equal(CpuDropout(0.2).eval()(x), x)
    assert torch.equal(CpuDropout(0.0)(x), x)


def tiny_lora(dropout: float):
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_causal_lm

    model = load_causal_lm("tiny")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))


def test_every_lora_layer_gets_it_and_eval_outputs_do_not_change():
    model = tiny_lora(0.1)
    layers = [m for m in model.modules() if hasattr(m, "lora_dropout") and "default" in m.lora_dropout]
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the LoRA branch, dropout and all, would add nothing
            param.data.normal_(0, 0.5)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert use_cpu_lora_dropout(model) == len(layers) > 0
    assert all(isinstance(m.lora_dropout["default"], CpuDropout) and m.lora_dropout["default"].p == 0.1 for m in layers)
    assert use_cpu_lora_dropout(model) == 0  # idempotent
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    # training mode: the seed repeats a step, and dropout does act
    model.train()
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[1], outs[2])


def test_without_dropout_nothing_is_replaced():
    assert use_cpu_lora_dropout(tiny_lora(0.0)) == 0


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fast", [True, False])
def test_fast_dpo_trainer_uses_it_and_plain_trl_does_not(tmp_path, fast):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from pipeline.models import prepare_tiny
    from trainers.fastpref.trainer import FastDPOTrainer

    path = prepare_tiny()
    rows = [{"prompt": "Hi", "chosen": " Hello there!", "rejected": " Go away."}] * 2
    trainer = FastDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=2),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        fast=fast,
        ref_cache_dir=tmp_path / "cache",
    )
    kinds = {type(m.lora_dropout["default"]) for m in trainer.model.modules() if hasattr(m, "lora_dropout")}
    assert kinds == ({CpuDropout} if fast else {torch.nn.Dropout})
