"""Benchmark: ConvSim simulation throughput, batched across conversations vs one at a time.

32 conversations x 3 rounds with SmolLM2-135M as both policy and simulated user (shared
weights, fp32 on CPU), every conversation forced to run all rounds (satisfied_threshold=1)
so both arms do the same protocol steps. No cache. Reports conversations/min and generated
tokens/s for each arm and their ratio.

The baseline is the same protocol code called with one conversation at a time (batch size
1): the honest "loop over users" a script would write. `--baseline-conversations` times
the baseline on the first N conversations only (its per-conversation cost does not depend
on N), to keep the run short on a shared machine; the JSON says when it was used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def users(n: int):
    from feedback.simulator.needs import load_users

    base = load_users(ROOT / "data" / "quickstart" / "needs.jsonl", facts_field=None)
    out = []
    for i in range(n):
        u = base[i % len(base)]
        out.append(type(u)(id=f"{u.id}#{i}", need=u.need, request=u.request))
    return out


def arm(backend, batch_size: int, conversations, rounds: int, per_conversation: bool, seed: int = 0):
    from feedback.simulator.protocol import Judge, ProtocolSettings, run_conversations
    from pipeline.llm_cache import CachedLLM

    backend.batch_size = batch_size
    llm = CachedLLM(backend, None)
    judge = Judge(llm, "both").calibrate()
    settings = ProtocolSettings(
        max_rounds=rounds,
        satisfied_threshold=1.0,
        policy_sampling={"max_new_tokens": 64, "temperature": 0.7},
        user_sampling={"max_new_tokens": 32, "temperature": 0.7},
    )
    llm.generated_tokens = 0
    start = time.perf_counter()
    if per_conversation:
        for u in conversations:
            run_conversations([u], llm, llm, settings, seed, judge)
    else:
        run_conversations(conversations, llm, llm, settings, seed, judge)
    seconds = time.perf_counter() - start
    return {
        "conversations": len(conversations),
        "rounds": rounds,
        "batch_size": batch_size,
        "seconds": seconds,
        "generated_tokens": llm.generated_tokens,
        "conversations_per_min": 60 * len(conversations) / seconds,
        "tokens_per_s": llm.generated_tokens / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--baseline-conversations", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from pipeline.llm import HFClient
    from pipeline.paths import heedful_home  # noqa: F401  (model cache location)

    torch.set_num_threads(args.threads)
    backend = HFClient("smollm2-135m", batch_size=args.batch_size)
    convs = users(args.conversations)
    batched = arm(backend, args.batch_size, convs, args.rounds, per_conversation=False)
    print(
        f"batched (batch {args.batch_size}): {batched['conversations_per_min']:.1f} conv/min, "
        f"{batched['tokens_per_s']:.1f} tok/s ({batched['seconds']:.0f}s)",
        flush=True,
    )
    base_convs = convs[: args.baseline_conversations] if args.baseline_conversations else convs
    single = arm(backend, 1, base_convs, args.rounds, per_conversation=True)
    print(
        f"one at a time:    {single['conversations_per_min']:.1f} conv/min, {single['tokens_per_s']:.1f} tok/s "
        f"({single['seconds']:.0f}s for {single['conversations']} conversations)",
        flush=True,
    )
    result = {
        "benchmark": "simulate",
        "model": "smollm2-135m (policy and simulator, shared weights, fp32 CPU)",
        "threads": args.threads,
        "batched": batched,
        "one_at_a_time": single,
        "speedup_conversations_per_min": batched["conversations_per_min"] / single["conversations_per_min"],
        "speedup_tokens_per_s": batched["tokens_per_s"] / single["tokens_per_s"],
        "note": f"baseline timed on the first {len(base_convs)} conversations" if args.baseline_conversations else "",
    }
    print(
        f"speedup: {result['speedup_conversations_per_min']:.2f}x conversations/min, "
        f"{result['speedup_tokens_per_s']:.2f}x tokens/s"
    )
    out = ROOT / "bench" / "results" / "simulate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
