"""GPU check of the packed preference core's varlen attention: same numbers as the SDPA pieces, and how fast.

The fast DPO/C3PO core (trainers/fastpref) runs each packed [prompt | chosen | rejected] unit's
attention as two pieces. On a CUDA GPU in bf16/fp16, `attention: auto` runs those pieces as two
variable-length kernel calls per layer for the whole batch (PyTorch's `varlen_attn`, else
flash-attn's `flash_attn_varlen_func`); elsewhere as SDPA calls per unit. No GPU was lent to the
sessions that wrote it, so this script is the proof to run where one is:

- the log-probs and LoRA gradients of one packed batch under `varlen` and `sdpa` pieces, and under
  transformers' SDPA with the 4D mask (the ground truth the pieces replace), in bf16 autocast;
- forward+backward milliseconds of each, median of `--reps` after two warm-ups.

The model is SmolLM2-135M's architecture (30 layers, 9 query and 3 key/value heads of 64) with
seeded random weights and a LoRA r16 on every linear layer: weights cannot travel to a device
machine (64 MiB), and the check compares attention paths on the same weights. It needs only torch,
transformers, peft and this checkout's trainers/fastpref, which a device machine's image has.

    python bench/gpu_check.py [--shape smollm2-135m] [--pairs 4] [--prompt 40 --reply 215] [--reps 10]
    python bench/gpu_check.py --dry-run      # CPU, a tiny shape, fp32, the kernel's CPU stand-in

Also the kernel alone against its contract (`attention.varlen_reference` in fp32): sequences with
fewer queries than keys, grouped heads, a non-default scale; outputs and gradients.

Writes bench/results/gpu_check.json (dry runs: gpu_check_dry.json; `--out` elsewhere). Exit status
1 when the kernel misses its contract (relative error over 2e-2 in bf16) or the varlen log-probs
differ from the masked ground truth by more than twice what the SDPA pieces' rounding gives (at
least 0.01 nat per token in bf16), 2 without a CUDA GPU (and no --dry-run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, save_results  # also puts the checkout on sys.path

#: model architectures by name (random weights): SmolLM2-135M-Instruct's, and a tiny one for dry runs
SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    ),
    "tiny": dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
    ),
}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: smollm2-135m (tiny with --dry-run)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=40, help="prompt tokens per pair")
    parser.add_argument("--reply", type=int, default=215, help="tokens per reply (chosen and rejected)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="on CPU with the kernel's stand-in (checks the script)")
    parser.add_argument("--out", default=None, help="the JSON's path (default: bench/results/gpu_check[_dry].json)")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainers.fastpref.attention import pair_kernel, varlen_reference, varlen_unavailable
    from trainers.fastpref.logps import packed_logps
    from trainers.fastpref.packing import pack, truncate

    if args.dry_run:
        device, dtype, shape = torch.device("cpu"), torch.float32, args.shape or "tiny"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU here (use --dry-run to check the script on CPU)", file=sys.stderr)
            return 2
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, args.shape or "smollm2-135m"
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, rope_theta=100000.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    head_dim = config.head_dim
    if args.dry_run:
        kernel, kernel_name = varlen_reference, "varlen_reference (CPU stand-in)"
    else:
        if why := varlen_unavailable(device, dtype, head_dim):
            print(f"gpu_check: {why}", file=sys.stderr)
            return 2
        kernel = pair_kernel("varlen", device, dtype, head_dim)
        kernel_name = getattr(kernel, "__name__", str(kernel))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)

    def ids(n: int) -> list[int]:
        return torch.randint(5, config.vocab_size - 1, (n,), generator=gen).tolist()

    # replies of slightly different lengths, so units differ and rows are shared or padded
    units = [truncate(ids(args.prompt), ids(args.reply - 7 * i), ids(args.reply - 3 * i), None) for i in range(args.pairs)]
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in pack(units, pad_token_id=0).items()}
    masked = {k: v for k, v in batch.items() if k != "segments"}

    def step(attention, b):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logps = packed_logps(model, b, attention=attention).seq_logps
        logps.float().sum().backward()
        return logps.detach().float().cpu(), torch.cat(
            [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
        )

    def timed(attention, b) -> float:
        for _ in range(2):
            step(attention, b)
        times = []
        for _ in range(args.reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(attention, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    tokens = torch.bincount(batch["score_seq"].cpu(), minlength=2 * len(units)).clamp(min=1)  # an empty reply: none
    result: dict = {
        "shape": shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "dtype": str(dtype),
        "kernel": kernel_name,
        "kernel_check": kernel_check(kernel, varlen_reference, device, dtype),
        "pairs": args.pairs,
        "tokens": int(batch["input_ids"].numel()),
        "arms": {},
    }
    print("kernel", result["kernel_check"], flush=True)
    truth, truth_grad = step("sdpa", masked)
    arms = {"varlen": (kernel, batch), "sdpa_pieces": ("sdpa", batch), "sdpa_masked": ("sdpa", masked)}
    for arm, (attention, b) in arms.items():
        try:
            logps, grad = step(attention, b)
            result["arms"][arm] = {
                "max_logp_diff_per_token_vs_masked": float(((logps - truth).abs() / tokens).max()),
                "grad_rel_diff_vs_masked": float((grad - truth_grad).norm() / truth_grad.norm()),
                "ms_forward_backward": round(timed(attention, b), 2),
            }
        except Exception as exc:  # recorded, so the other arms and the JSON still come back
            result["arms"][arm] = {"error": f"{type(exc).__name__}: {exc}"}
        print(arm, result["arms"][arm], flush=True)
    # the varlen arm may differ from the masked SDPA by rounding as much as the SDPA pieces do, twice over
    varlen, pieces = result["arms"]["varlen"], result["arms"]["sdpa_pieces"]
    floor = 1e-5 if dtype == torch.float32 else 1e-2
    result["ok"] = bool(
        result["kernel_check"].get("ok")
        and "error" not in varlen
        and varlen["max_logp_diff_per_token_vs_masked"] <= max(floor, 2 * pieces.get("max_logp_diff_per_token_vs_masked", 0.0))
    )
    out = args.out or ROOT / "bench" / "results" / ("gpu_check_dry.json" if args.dry_run else "gpu_check.json")
    save_results(result, Path(out))
    print(f"varlen attention {'matches' if result['ok'] else 'DOES NOT match'} its contract and the masked SDPA")
    return 0 if result["ok"] else 1


def kernel_check(kernel, reference, device, dtype) -> dict:
    """The kernel alone against its contract (`reference`, in fp32): sequences with fewer queries
    than keys (where the bottom-right alignment shows), grouped heads, a scale that is not the
    default; outputs and q/k/v gradients as relative errors."""
    import torch

    gen = torch.Generator().manual_seed(1)
    q_len, k_len = [5, 37, 64, 1, 130], [45, 44, 64, 201, 133]

    def offsets(lengths):
        return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    tensors = [torch.randn(sum(n), h, 64, generator=gen) for n, h in ((q_len, 9), (k_len, 3), (k_len, 3))]
    weight = torch.randn(sum(q_len), 9, 64, generator=gen).to(device)
    args = (offsets(q_len), offsets(k_len), max(q_len), max(k_len), 0.3)
    runs = []
    for fn, kind in ((kernel, dtype), (reference, torch.float32)):
        q, k, v = (t.to(device, kind).requires_grad_() for t in tensors)
        try:
            out = fn(q, k, v, *args)
            (out.float() * weight).sum().backward()
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        runs.append([t.detach().float() for t in (out, q.grad, k.grad, v.grad)])
    errors = {name: float((got - want).norm() / want.norm()) for name, got, want in zip(("out", "dq", "dk", "dv"), *runs)}
    return {**errors, "ok": max(errors.values()) <= (1e-5 if dtype == torch.float32 else 2e-2)}


if __name__ == "__main__":
    sys.exit(main())
