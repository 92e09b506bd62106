"""Decode-sized linear calls through oneDNN's packed weights: the same numbers as the layer's own
forward within float rounding, the same seeded replies from `chat_generate`, nothing left on the
model after the block, and training untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline import cpu_linear
from pipeline.generation import SamplingSettings, chat_generate
from pipeline.models import device_policy, load_causal_lm, load_tokenizer

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this PyTorch has no oneDNN packed linear")


def test_small_no_grad_calls_take_the_packed_weight_and_match_the_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    x = torch.randn(3, 5, 48)  # 15 rows: a decode step's shape
    expected = layer(x)
    with cpu_linear.packed_linears(layer) as routed, torch.no_grad():
        assert routed == 1
        with torch.profiler.profile() as small:
            got = layer(x)
        with torch.profiler.profile() as large:
            big = layer(torch.randn(cpu_linear.MAX_ROWS + 1, 48))  # a prefill: the layer's own forward
        with torch.profiler.profile() as one:
            layer(torch.randn(1, 48))  # one row: a matrix-vector product, the layer's own forward
    assert any(e.key == "mkldnn::_linear_pointwise" for e in small.key_averages())
    assert not any(e.key == "mkldnn::_linear_pointwise" for e in [*large.key_averages(), *one.key_averages()])
    assert big.shape == (cpu_linear.MAX_ROWS + 1, 80)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    assert "forward" not in layer.__dict__  # restored when the block ends


@pytest.mark.skipif(torch.bfloat16 not in cpu_linear.routed_dtypes(), reason="no oneDNN bf16 kernels on this CPU")
def test_bf16_layers_take_the_packed_weight_from_one_row_and_keep_their_numbers():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)  # one row: a bf16 matrix-vector product is faster packed
    with torch.no_grad():
        expected = layer(x)
        with cpu_linear.packed_linears(layer) as routed, torch.profiler.profile() as prof:
            got = layer(x)
            with pytest.raises(RuntimeError, match="same dtype"):  # the layer's own forward, its own error
                layer(x.float())
    assert routed == 1 and got.dtype == torch.bfloat16
    assert [e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise"] == [1]
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_a_block_is_worth_opening_from_the_fewest_rows_any_routable_layer_takes():
    fp32 = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    assert cpu_linear.model_min_rows(fp32) == cpu_linear.MIN_ROWS
    assert cpu_linear.model_min_rows(torch.nn.Sequential(torch.nn.Embedding(10, 8))) is None  # nothing to route
    if torch.bfloat16 in cpu_linear.routed_dtypes():  # fp32 embeddings, a bf16 linear: the linear decides
        mixed = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8).to(torch.bfloat16))
        assert cpu_linear.model_min_rows(mixed) == cpu_linear.MIN_ROWS_BF16


def test_a_weight_changed_in_place_is_packed_again_and_gradients_use_the_layer():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with cpu_linear.packed_linears(layer):
        with torch.no_grad():
            before = layer(x)
            layer.weight.add_(1.0)  # a training step or a merged adapter
            after = layer(x)
        torch.testing.assert_close(after, before + x.sum(-1, keepdim=True), atol=1e-4, rtol=1e-4)
        out = layer(x)  # gradients on: the layer's own forward, so backward works
        out.sum().backward()
        assert layer.weight.grad is not None
        clone = copy.deepcopy(layer)  # a copy made inside the block computes with its own weights
    with torch.no_grad():
        clone.weight.mul_(2.0)
        torch.testing.assert_close(clone(x), torch.nn.functional.linear(x, clone.weight, clone.bias), atol=1e-4, rtol=1e-4)


def test_nested_blocks_restore_only_when_the_last_one_leaves_and_drop_the_packed_copies():
    layer = torch.nn.Linear(4, 4)
    with cpu_linear.packed_linears(layer):
        with cpu_linear.packed_linears(layer), torch.no_grad():
            assert "forward" in layer.__dict__
            layer(torch.randn(3, 4))
        assert "forward" in layer.__dict__ and layer in cpu_linear._PACKED
    assert "forward" not in layer.__dict__ and layer not in cpu_linear._PACKED


class OwnForward(torch.nn.Linear):
    """A Linear subclass with a forward of its own (as bitsandbytes' 4-bit layers have)."""

    def forward(self, x, scale: float = 2.0):
        return super().forward(x) * scale


def test_a_linear_subclass_with_its_own_forward_keeps_it():
    model = torch.nn.Sequential(OwnForward(6, 6), torch.nn.Linear(6, 3))
    x = torch.randn(4, 6)
    expected = model(x).detach()
    with cpu_linear.packed_linears(model) as routed, torch.no_grad():
        assert routed == 1 and "forward" not in model[0].__dict__
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_seeded_replies_equal_with_and_without_packed_weights(tiny_model_path, lora_adapter, monkeypatch, with_adapter):
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter if with_adapter else None).eval()
    conversations = [[{"role": "user", "content": f"Name {n} things you like about rivers."}] for n in range(2, 7)]
    sampled = SamplingSettings(max_new_tokens=12, temperature=1.0)  # tiny's greedy replies are blank
    packed = chat_generate(model, tokenizer, conversations, sampled, batch_size=5, seed=4)
    monkeypatch.setenv(cpu_linear.ENV, "0")
    plain = chat_generate(model, tokenizer, conversations, sampled, batch_size=5, seed=4)
    assert [[(c.text, c.num_tokens) for c in r] for r in packed] == [[(c.text, c.num_tokens) for c in r] for r in plain]
    assert all(r[0].text for r in plain)


def test_a_lora_adapters_own_projections_keep_their_forward(tiny_model_path, lora_adapter):
    """The base layers under a LoRA adapter are packed, the adapter's rank-r A and B are not (a packed
    call costs them more than it saves: pipeline/cpu_linear.py `_routable`), and the block's output
    equals the model's own."""
    model = load_causal_lm("tiny", device_policy("cpu"), adapter=lora_adapter).eval()
    adapter_layers = [layer for m in model.modules() for name in ("lora_A", "lora_B") for layer in getattr(m, name, {}).values()]
    bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert adapter_layers and bases
    ids = torch.tensor([[1, 20, 30, 40], [1, 50, 60, 70]])
    with torch.no_grad():
        expected = model(ids).logits
        with cpu_linear.packed_linears(model):
            assert all("forward" in base.__dict__ for base in bases)
            assert not any("forward" in layer.__dict__ for layer in adapter_layers)
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
