"""Per-token log-probabilities of chosen tokens, chunked over tokens, from hidden states.

Why: the full [tokens, 49k vocab] logits and their log-softmax, kept for backward, are the
largest tensors of a DPO step on a small model, and TRL on CPU projects every position
(prompt and padding included). `ChunkedLogps` projects only the scored positions, a few
hundred tokens at a time: the forward keeps one [chunk, vocab] tile alive, so memory is
O(chunk x vocab) and the result is exact.

The gradient: d logp / d hidden = W[target] - softmax(z) @ W does not depend on the loss, so
when only the hidden states need a gradient (a frozen head: LoRA, the usual case) the forward
computes it per tile while the tile is in hand and saves that [tokens, hidden] matrix; the
backward is then one multiply. That saves re-projecting every tile in backward (a third of
the head's arithmetic). A trainable head (or bias) keeps the other path: the forward saves the
log-normaliser per token and the backward recomputes each tile into softmax minus one-hot.

It also returns, without gradient, what TRL logs per token: the entropy of the next-token
distribution, the mean logit and whether the target is the top-1 token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

#: elements of one [chunk, vocab] fp32 tile (32 MiB): ~170 tokens for a 49k vocabulary
TILE_ELEMENTS = 1 << 23


def _chunks(n: int, vocab: int, tile_elements: int):
    step = max(1, tile_elements // max(vocab, 1))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One tile of logits, projected in `dtype` (the autocast dtype under mixed precision), reduced in fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        z = hidden.to(dtype) @ weight.to(dtype).t()
        if bias is not None:
            z = z + bias.to(dtype)
    return z.float()


def _times_weight(tile: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tile @ weight` as an fp32 result, multiplied in `dtype`: under bf16 the [chunk, vocab] x
    [vocab, hidden] product runs on the CPU's or GPU's bf16 units (5x fp32's speed on a CPU with
    AVX512_BF16) with fp32 accumulation, instead of in fp32 on an fp32 copy of the whole head."""
    with torch.autocast(tile.device.type, enabled=False):
        if dtype != torch.bfloat16:  # fp32, and fp16 (whose range a scaled tile could exceed)
            return tile @ weight.float()
        return (tile.to(dtype) @ weight.to(dtype)).float()


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


@contextlib.contextmanager
def autocast_forward(accelerator: Any, model: torch.nn.Module) -> Iterator[None]:
    """The trainer's autocast (what accelerate's wrapped forward does under bf16/fp16), with PEFT's
    input casts off while it is on.

    Why: PEFT casts every LoRA layer's input to its adapter weights' dtype (fp32) before the
    low-rank product, and autocast casts it straight back to bf16 for that product: two copies of
    every [tokens, hidden] activation per LoRA layer, and two more of its gradient. On a CPU with
    bf16 units they were 10-15% of a small-batch bf16 DPO step (the quickstart's: `copy_` of
    [4, 173, 576] and [4, 173, 1536] activations). The values are the same: the input is already
    in the autocast dtype, so the round trip through fp32 is exact, and so is its gradient's. With
    LoRA dropout on, the dropout's product is rounded once, to the autocast dtype, instead of to
    fp32 and then to it. Outside autocast (fp32 training) PEFT's casts stay as they are, and so do
    those of a layer with a LoRA variant (DoRA and the like compute more from the cast input)."""
    with accelerator.autocast():
        if not torch.is_autocast_enabled(accelerator.device.type):
            yield
            return
        from peft.tuners.lora import LoraLayer

        layers = [
            m
            for m in model.modules()
            if isinstance(m, LoraLayer) and not getattr(m, "lora_variant", None) and getattr(m, "cast_input_dtype_enabled", True)
        ]
        for layer in layers:
            layer.cast_input_dtype_enabled = False
        try:
            yield
        finally:
            for layer in layers:
                layer.cast_input_dtype_enabled = True


class ChunkedLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] per row, and (no grad) entropy, mean logit, is-top-1."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        tile_elements: int = TILE_ELEMENTS,
        with_metrics: bool = True,
        grad_enabled: bool = True,
    ):
        """`grad_enabled`: torch.is_grad_enabled() at the call (off inside forward); False skips the gradient work."""
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        ctx.compute_dtype = dtype = _compute_dtype(hidden)
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        # frozen head: the hidden states' gradient per unit of upstream gradient, built tile by tile
        ctx.grad_in_forward = need_h and not need_w and not need_b
        d_logp_d_h = torch.empty_like(hidden, dtype=torch.float32) if ctx.grad_in_forward else None
        logp = hidden.new_empty(n, dtype=torch.float32)
        log_z = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n, dtype=torch.float32)
        mean_logit = hidden.new_zeros(n, dtype=torch.float32)
        top1 = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        if with_metrics:  # mean_z = h . mean(W) (+ mean(b)): a matrix-vector product, no pass over the tile
            with torch.autocast(hidden.device.type, enabled=False):
                mean_row = weight.mean(0, dtype=torch.float32)
                mean_logit.copy_(hidden.float() @ mean_row + (bias.float().mean() if bias is not None else 0.0))
        # with a frozen head in fp32 the entropy comes from the gradient's E_p[W] (below); under autocast the
        # logits are rounded to bf16/fp16, so it is taken from the tile itself, as the logits were computed
        entropy_from_product = d_logp_d_h is not None and dtype == torch.float32
        for s, e in _chunks(n, vocab, tile_elements):
            z = _logits(hidden[s:e], weight, bias, dtype)
            peak, argmax = z.max(dim=-1)
            target_logit = z.gather(1, targets[s:e, None]).squeeze(1)
            if with_metrics:
                top1[s:e] = argmax == targets[s:e]
            z.sub_(peak[:, None])
            # the tile's passes are memory-bound: the softmax's numerator in place when nothing reads z after
            keep_z = with_metrics and not entropy_from_product
            expz = z.exp() if keep_z else z.exp_()
            total = expz.sum(dim=-1)
            log_z[s:e] = peak + total.log()
            logp[s:e] = target_logit - log_z[s:e]
            if d_logp_d_h is not None:  # W[target] - softmax @ W, as the backward path computes it
                with torch.autocast(hidden.device.type, enabled=False):
                    expected_w = _times_weight(expz, weight, dtype).div_(total[:, None])  # E_p[W]: 1/Z folded in after
                    # W[target] rounded as E_p[W]'s W was, so the two cancel as p(target) -> 1
                    target_w = torch.index_select(weight, 0, targets[s:e])
                    if dtype == torch.bfloat16:
                        target_w = target_w.to(dtype)
                    d_logp_d_h[s:e] = target_w.float() - expected_w
                    if with_metrics and entropy_from_product:  # H = log Z - E_p[z], E_p[z] = E_p[W] . h + E_p[b]
                        expected_z = (expected_w * hidden[s:e].float()).sum(-1)
                        if bias is not None:
                            expected_z += (expz @ bias.float()) / total
                        entropy[s:e] = log_z[s:e] - expected_z
            if with_metrics and not entropy_from_product:  # H = log Z - E_p[z], both shifted by the peak
                entropy[s:e] = total.log() - torch.linalg.vecdot(expz, z) / total
        if d_logp_d_h is not None:
            ctx.save_for_backward(d_logp_d_h)
            ctx.hidden_dtype = hidden.dtype
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        ctx.tile_elements = tile_elements
        ctx.mark_non_differentiable(entropy, mean_logit, top1)
        return logp, entropy, mean_logit, top1

    @staticmethod
    def backward(ctx, grad_logp, *_):
        none = (None,) * 4  # targets, tile_elements, with_metrics, grad_enabled
        if grad_logp is None:
            return None, None, None, *none
        if ctx.grad_in_forward:
            (d_logp_d_h,) = ctx.saved_tensors
            return (d_logp_d_h * grad_logp.float()[:, None]).to(ctx.hidden_dtype), None, None, *none
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        g = grad_logp.float()
        for s, e in _chunks(hidden.shape[0], weight.shape[0], ctx.tile_elements):
            # d logp / dz = onehot(target) - softmax(z), scaled by the incoming gradient
            tile = _logits(hidden[s:e], weight, bias, ctx.compute_dtype).sub_(log_z[s:e, None]).exp_().mul_(-g[s:e, None])
            tile.scatter_add_(1, targets[s:e, None], g[s:e, None])
            if need_h:
                grad_h[s:e] = _times_weight(tile, weight, ctx.compute_dtype)
            if need_w:
                grad_w.addmm_(tile.t(), hidden[s:e].float())
            if need_b:
                grad_b += tile.sum(dim=0)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            *none,
        )


class ChunkedKL(torch.autograd.Function):
    """T^2 * KL(softmax(ref_hidden W^T / T) || softmax(hidden W^T / T)) per row, through a frozen head, in tiles.

    Why: a KL to the reference over the whole vocabulary (C3PO's regulariser) otherwise keeps the
    policy's and the reference's [positions, 49k] logits and log-softmaxes for backward. Here one
    tile of each is alive at a time, and since the head is frozen the hidden states' gradient,
    T (q - p) @ W per row (q the policy's, p the reference's softened distribution), is built in
    the forward while the tile is in hand, as `ChunkedLogps` does. The reference enters as its
    hidden states (no gradient), which a trainer can cache: they are [positions, hidden] only.
    """

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, bias, temperature: float, tile_elements: int = TILE_ELEMENTS, grad_enabled=True):
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise ValueError("ChunkedKL needs a frozen head (LoRA leaves it frozen); a trainable head takes the full logits")
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden)
        kl = hidden.new_empty(n, dtype=torch.float32)
        grad = torch.empty_like(hidden, dtype=torch.float32) if grad_enabled and ctx.needs_input_grad[0] else None
        for s, e in _chunks(n, vocab, tile_elements):
            log_q = _logits(hidden[s:e], weight, bias, dtype).div_(temperature).log_softmax(-1)
            log_p = _logits(ref_hidden[s:e], weight, bias, dtype).div_(temperature).log_softmax(-1)
            p = log_p.exp()
            # log_p is not read again: the difference in place, no [chunk, vocab] temporary
            kl[s:e] = torch.linalg.vecdot(p, log_p.sub_(log_q)) * temperature**2
            if grad is not None:  # d(T^2 KL)/dz = T (q - p), z = W h; T applied to the [chunk, hidden] product
                with torch.autocast(hidden.device.type, enabled=False):
                    grad[s:e] = _times_weight(log_q.exp_().sub_(p), weight, dtype).mul_(temperature)
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        grad_h = None if grad_kl is None or grad.numel() == 0 else (grad * grad_kl.float()[:, None]).to(ctx.hidden_dtype)
        return grad_h, None, None, None, None, None, None


def chunked_kl(
    hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """`ChunkedKL` per row, with the default tiles (typed entry point)."""
    kl: torch.Tensor = ChunkedKL.apply(hidden, ref_hidden, weight, bias, temperature, TILE_ELEMENTS, torch.is_grad_enabled())
    return kl


@dataclass
class PackedLogps:
    """Log-probs of a packed batch: per sequence (chosen first, then rejected) and per scored token."""

    seq_logps: torch.Tensor  # [2n]: chosen_0..chosen_{n-1}, rejected_0..rejected_{n-1}
    token_logps: torch.Tensor  # [N]
    token_seq: torch.Tensor  # [N]: the sequence each scored token belongs to
    entropy: torch.Tensor  # [N], no grad
    mean_logit: torch.Tensor  # [N], no grad
    top1: torch.Tensor  # [N] bool

    @property
    def n_pairs(self) -> int:
        return self.seq_logps.shape[0] // 2

    def chosen_rejected(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n_pairs
        return self.seq_logps[:n], self.seq_logps[n:]


def unwrap_peft(model: Any) -> Any:
    """The underlying transformers model of a PEFT-wrapped one (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


#: config fields (of the model's text config) with which a model changes its logits after the head:
#: Gemma-2/3's tanh soft-capping (`final_logit_softcapping`), Cohere's `logit_scale`, Granite's
#: `logits_scaling` (a divisor), Falcon-H1's `lm_head_multiplier`, `output_multiplier`
LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def _configs(model: Any) -> list[Any]:
    """The model's config and, where it has one apart, its text config (multimodal models keep the
    language model's fields there)."""
    config = getattr(unwrap_peft(model), "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def logit_changes(model: Any) -> list[str]:
    """The config fields with which `model` changes its logits after `hidden @ head.weight.T` (soft-
    capping, a scale or divisor, a cut to an unpadded vocabulary); empty when it does not. Why: a core
    that takes the log-softmax of the head's own product would score such a model's raw logits, and
    its loss, gradients and cached reference would differ from the model's (TRL's) with no error."""
    found: list[str] = []
    for config in _configs(model):
        if getattr(config, "final_logit_softcapping", None) is not None:
            found.append("final_logit_softcapping")
        found += [f for f in LOGIT_SCALES if getattr(config, f, None) not in (None, 1, 1.0)]
        unpadded = getattr(config, "unpadded_vocab_size", None)
        if unpadded is not None and unpadded < (getattr(config, "vocab_size", None) or unpadded + 1):
            found.append("unpadded_vocab_size")
    return list(dict.fromkeys(found))


def body_then_head(model: Any) -> str | None:
    """None when the model's logits are its body's last hidden states times the head's own
    `weight` (what projecting only some positions relies on); otherwise why not: an adapter on
    the LM head (PEFT wraps it, and `weight` is then the base layer's, without the adapter's
    change), a prompt-learning adapter (virtual tokens the bare body would not see), or logits the
    model changes after the head (`logit_changes`: soft-capping, a logit scale)."""
    changes = logit_changes(model)
    if changes:
        return f"logits changed after the head by {', '.join(changes)}"
    base = unwrap_peft(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None and hasattr(head, "base_layer"):
        return "an adapter on the LM head"
    configs = getattr(model, "peft_config", None) or {}
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else None
    if config is not None and getattr(config, "is_prompt_learning", False):
        return "a prompt-learning adapter"
    return None


def attention_window(model: Any, max_length: int | None = None) -> str | None:
    """None when every attention layer of `model` attends over the whole causal context, the only
    attention the packed core's pieces (attention.py) and its 4D mask (packing.py) compute; otherwise
    why not. A sliding window (Mistral, Phi-3, Gemma-2/3, gpt-oss, Qwen2 with `use_sliding_window`)
    counts only where a sequence can be longer than it: with `max_length` <= the window no token is
    ever `window` or more positions from one it attends to, and full causal attention is exact.
    Chunked attention (Llama 4) and layers that are not attention (linear attention, state-space
    layers, which would carry a state from one packed unit into the next) always count."""
    for config in _configs(model):
        kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
        if kinds:
            return f"layers of type {', '.join(sorted(map(str, kinds)))}"
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) is not False:
            if max_length is None:
                return f"sliding-window attention (window {window}, no max_length)"
            if max_length > window:
                return f"sliding-window attention (window {window} < max_length {max_length})"
    return None


def first_unsupported(checks: dict[str, bool], model: Any) -> str | None:
    """Why a fast core cannot run: the first of `checks` (why: does it hold) that holds, else what
    every core that projects only some positions needs of the model (`body_then_head`); None when
    it can. `model` is the accelerator-unwrapped (possibly PEFT-wrapped) model."""
    return next((why for why, bad in checks.items() if bad), None) or body_then_head(model)


def backbone_and_head(model):
    """The transformer body and the LM head of a (PEFT-wrapped) causal LM: the body's hidden
    states go to `ChunkedLogps` instead of the model's full-vocabulary head."""
    base = unwrap_peft(model)
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def packed_hidden(model, batch: dict, attention: Any = "auto") -> tuple[torch.Tensor, Any]:
    """The body's last hidden states at a packed batch's (packing.pack) scored positions [N, H],
    in `score_*` order, and the LM head that projects them. `attention`: attention.ATTENTION_CHOICES
    (auto: varlen kernels on a CUDA GPU in fp16/bf16, else SDPA pieces) or a varlen kernel."""
    from .attention import install, pair_kernel
    from .packing import attention_mask_for

    body, head = backbone_and_head(model)
    implementation = getattr(body.config, "_attn_implementation", None)
    mask = attention_mask_for(batch["pair_mask"], implementation, head.weight.dtype)
    layout: dict[str, Any] = {}
    if (implementation or "sdpa") == "sdpa" and "segments" in batch:  # two causal pieces per unit, not the masked square
        install()
        layout["pair_segments"] = batch["segments"]
        config = body.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kernel = pair_kernel(attention, head.weight.device, _compute_dtype(head.weight), head_dim)
        if kernel is not None:
            layout["pair_kernel"] = kernel
    elif attention == "varlen" or callable(attention):
        raise ValueError(f"attention: varlen needs the packed layout on SDPA attention, not {implementation!r}")
    hidden = body(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False, **layout
    ).last_hidden_state
    return hidden[batch["score_row"], batch["score_pos"]], head


def packed_logps(
    model, batch: dict, tile_elements: int = TILE_ELEMENTS, with_metrics: bool = True, attention: Any = "auto"
) -> PackedLogps:
    """Run a packed batch (packing.pack) through `model` and score its reply tokens."""
    scored, head = packed_hidden(model, batch, attention)
    logp, entropy, mean_logit, top1 = ChunkedLogps.apply(
        scored, head.weight, head.bias, batch["score_target"], tile_elements, with_metrics, torch.is_grad_enabled()
    )
    seq = batch["score_seq"]
    seq_logps = logp.new_zeros(2 * batch["n_pairs"]).index_add(0, seq, logp)
    return PackedLogps(seq_logps, logp, seq, entropy, mean_logit, top1)
