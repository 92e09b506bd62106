"""GPU check of the packed preference core's varlen attention: same numbers as the SDPA pieces, and how fast.

The fast DPO/C3PO core (trainers/fastpref) runs each packed [prompt | chosen | rejected] unit's
attention as two pieces. On a CUDA GPU in bf16/fp16, `attention: auto` runs those pieces as two
variable-length kernel calls per layer for the whole batch (PyTorch's `varlen_attn`, else
flash-attn's `flash_attn_varlen_func`); elsewhere as SDPA calls per unit. No GPU was lent to the
sessions that wrote it, so this script is the proof to run where one is:

- the log-probs and LoRA gradients of one packed batch under `varlen` and `sdpa` pieces, and under
  transformers' SDPA with the 4D mask (the ground truth the pieces replace), in bf16 autocast;
- forward+backward milliseconds of each, median of `--reps` after two warm-ups.

    python bench/gpu_check.py [--model smollm2-135m] [--pairs 4] [--prompt 40 --reply 215] [--reps 10]
    python bench/gpu_check.py --dry-run      # CPU, the `tiny` model, fp32, the kernel's CPU stand-in

Writes bench/results/gpu_check.json (dry runs: gpu_check_dry.json). Exit status 1 when the
varlen log-probs differ from the masked ground truth by more than the tolerance (bf16: 0.05 nat
per sequence; fp32 dry run: 1e-4), 2 without a CUDA GPU (and no --dry-run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import ROOT, save_results  # also puts the checkout on sys.path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: smollm2-135m (tiny with --dry-run)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=40, help="prompt tokens per pair")
    parser.add_argument("--reply", type=int, default=215, help="tokens per reply (chosen and rejected)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="on CPU with the kernel's stand-in (checks the script)")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.models import device_policy, load_causal_lm
    from trainers.fastpref.attention import pair_kernel, varlen_reference, varlen_unavailable
    from trainers.fastpref.logps import packed_logps
    from trainers.fastpref.packing import pack, truncate

    if args.dry_run:
        device, dtype, model_name = torch.device("cpu"), torch.float32, args.model or "tiny"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU here (use --dry-run to check the script on CPU)", file=sys.stderr)
            return 2
        device, dtype, model_name = torch.device("cuda"), torch.bfloat16, args.model or "smollm2-135m"
    model = load_causal_lm(model_name, device_policy(device.type, precision="float32")).to(device)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
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

    truth, truth_grad = step("sdpa", masked)
    arms = {"varlen": (kernel, batch), "sdpa_pieces": ("sdpa", batch), "sdpa_masked": ("sdpa", masked)}
    result: dict = {
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "dtype": str(dtype),
        "kernel": kernel_name,
        "pairs": args.pairs,
        "tokens": int(batch["input_ids"].numel()),
        "arms": {},
    }
    for arm, (attention, b) in arms.items():
        logps, grad = step(attention, b)
        result["arms"][arm] = {
            "max_abs_logp_diff_vs_masked": round(float((logps - truth).abs().max()), 6),
            "grad_rel_diff_vs_masked": round(float((grad - truth_grad).norm() / truth_grad.norm()), 6),
            "ms_forward_backward": round(timed(attention, b), 2),
        }
        print(arm, result["arms"][arm], flush=True)
    tolerance = 1e-4 if dtype == torch.float32 else 0.05
    result["tolerance"] = tolerance
    result["ok"] = result["arms"]["varlen"]["max_abs_logp_diff_vs_masked"] <= tolerance
    name = "gpu_check_dry.json" if args.dry_run else "gpu_check.json"
    save_results(result, ROOT / "bench" / "results" / name)
    print(f"varlen {'matches' if result['ok'] else 'DOES NOT match'} the masked SDPA (tolerance {tolerance})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
