"""Benchmark: heedful's HF path with the in-place key/value cache against transformers'
concatenating one (pipeline/kv_cache.py), in one run.

Both arms are `pipeline.generation.chat_generate` on the same model in the host's precision
(pipeline/precision.py) with packed weights and the shared start run once; the only difference is
`HEEDFUL_GROWING_KV` (1: the in-place cache, 0: `DynamicLayer`'s `torch.cat` every step).
Workloads, greedy so both arms write the same tokens:

- `feedback`: a simulated user's feedback prompts (feedback/simulator/prompts.py: instructions and
  few-shot examples, ~330 tokens), 32 new tokens: the simulated users' calls in `simulate` and
  `evaluate`;
- `replies`: bench/generate.py's prompts (41-118 tokens), 64 new tokens: sampling and held-out
  replies.

Arms alternate which goes first per repetition; the best of `--reps` is kept. The replies of the
two arms are compared as text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common import RESULTS, matmul_peak_flops, save_results, steal_share, steal_since
from generate import machine, prompts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def feedback_conversations(n: int) -> list:
    from feedback.simulator import prompts as sim

    out = []
    for i in range(n):
        need, request, answer, _ = sim.CALIBRATION[i % len(sim.CALIBRATION)]
        out.append(sim.feedback_messages(need, f"{request} (case {i})", answer))
    return out


def run(model, tokenizer, conversations, max_new_tokens: int, batch: int, growing: bool):
    from pipeline.generation import SamplingSettings, chat_generate

    os.environ["HEEDFUL_GROWING_KV"] = "1" if growing else "0"
    sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    start = time.perf_counter()
    out = chat_generate(model, tokenizer, conversations, sampling, batch_size=batch)
    return [c[0] for c in out], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="4,12,32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="kv_cache.json", help="results file name under bench/results")
    args = parser.parse_args()

    import torch

    from pipeline.models import device_policy, load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    policy = device_policy("cpu")
    model = load_causal_lm(args.model, policy).eval()
    tokenizer = load_tokenizer(args.model)
    result: dict = {"machine": machine(), "model": args.model, "dtype": policy.dtype_name, "threads": args.threads}
    result["matmul_peak_gflops"] = round(matmul_peak_flops() / 1e9, 1)
    steal = steal_share()
    rows = []
    workloads = {
        "feedback": (feedback_conversations, 32),
        "replies": (lambda n: [[{"role": "user", "content": p}] for p in prompts(n)], 64),
    }
    for name, (make, new_tokens) in workloads.items():
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            conversations = make(batch)
            run(model, tokenizer, conversations, new_tokens, batch, True)  # warm-up
            times: dict[bool, list[float]] = {True: [], False: []}
            texts: dict[bool, list[str]] = {}
            for rep in range(args.reps):
                for growing in (rep % 2 == 0, rep % 2 != 0):
                    out, seconds = run(model, tokenizer, conversations, new_tokens, batch, growing)
                    times[growing].append(seconds)
                    texts[growing] = [c.text for c in out]
                    tokens = sum(c.num_tokens for c in out)
            row = {
                "workload": name,
                "batch": batch,
                "new_tokens": new_tokens,
                "concatenating_s": round(min(times[False]), 3),
                "in_place_s": round(min(times[True]), 3),
                "speedup": round(min(times[False]) / min(times[True]), 3),
                "tokens": tokens,
                "same_replies": sum(a == b for a, b in zip(texts[True], texts[False])),
                "replies": batch,
            }
            rows.append(row)
            print(
                f"{name:8s} batch {batch:3d}: concatenating {row['concatenating_s']:.2f}s, in place {row['in_place_s']:.2f}s, "
                f"x{row['speedup']:.2f}, same replies {row['same_replies']}/{batch}",
                flush=True,
            )
    result["rows"] = rows
    result["steal_share"] = steal_since(steal)
    save_results(result, RESULTS / args.out)


if __name__ == "__main__":
    main()
