"""FLR scoring throughput: heedful's packed pass (all follow-ups of a reply in ONE forward pass,
shared prefix computed once) vs. one forward pass per follow-up, in one run.

SmolLM2-135M-Instruct, fp32 on CPU, real replies (qa-feedback questions and answers), the
shipped 48 follow-ups. Baselines: (a) one pass per follow-up, batch size 1 (what the naive
implementation does); (b) the same passes batched per reply (N right-padded rows of
prefix+follow-up: the strongest honest no-reuse baseline). Also checks the scores agree
(max |difference|) and prints achieved FLOP/s against a measured fp32 matmul peak.

    python bench/rewards.py [--replies 6] [--json bench/results/rewards.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import QA, ROOT, matmul_peak_flops, save_results


def forward_flops(config, tokens: int, attended: int) -> float:
    """~2 * params per token (+ LM head) + attention over `attended` (query, key) pairs."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_token = layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    return 2 * per_token * tokens + layers * 4 * d * attended


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replies", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="replies per packed pass")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "rewards.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from pipeline.models import prepare_smollm2
    from pipeline.paths import data_dir
    from reward_models.followup import FollowupReward, Followups, naive_logprobs, packed_logprobs

    torch.set_num_threads(os.cpu_count() or 1)
    rows = json.loads(QA.read_text())[: args.replies]
    prompts = [r["question"] for r in rows]
    replies = [r["prediction 1"] for r in rows]
    followups = Followups.load(data_dir() / "followups" / "flr_followups.json")
    rm = FollowupReward.from_pretrained("smollm2-135m", followups, batch_size=args.batch_size)
    config = AutoConfig.from_pretrained(prepare_smollm2())
    prefixes = [rm.prefix_ids(p, r) for p, r in zip(prompts, replies)]
    f_lens = [len(f) for f in rm.followup_ids]
    n = len(f_lens)

    packed_logprobs(rm.model, prefixes[:1], rm.followup_ids, rm.pad_id)  # warm-up
    packed, t_packed = timed(lambda: rm.logprobs(prompts, replies))
    batched_naive, t_batched = timed(
        lambda: torch.cat([naive_logprobs(rm.model, [p], rm.followup_ids, rm.pad_id, batch_followups=True) for p in prefixes])
    )
    naive, t_naive = timed(lambda: torch.cat([naive_logprobs(rm.model, [p], rm.followup_ids, rm.pad_id) for p in prefixes]))

    packed_tokens = sum(len(p) + sum(f_lens) for p in prefixes)
    naive_tokens = sum(len(p) * n + sum(f_lens) for p in prefixes)
    packed_flops = sum(
        forward_flops(config, len(p) + sum(f_lens), len(p) ** 2 // 2 + sum(len(p) * f + f * f // 2 for f in f_lens))
        for p in prefixes
    )
    naive_flops = sum(forward_flops(config, len(p) + f, (len(p) + f) ** 2 // 2) for p in prefixes for f in f_lens)
    peak = matmul_peak_flops()
    result = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "threads": torch.get_num_threads(),
        "replies": len(replies),
        "followups_per_reply": n,
        "mean_prefix_tokens": round(sum(len(p) for p in prefixes) / len(prefixes), 1),
        "mean_followup_tokens": round(sum(f_lens) / n, 2),
        "packed_replies_per_s": round(len(replies) / t_packed, 3),
        "one_pass_per_followup_replies_per_s": round(len(replies) / t_naive, 3),
        "batched_per_reply_replies_per_s": round(len(replies) / t_batched, 3),
        "speedup_vs_one_pass_per_followup": round(t_naive / t_packed, 2),
        "speedup_vs_batched_per_reply": round(t_batched / t_packed, 2),
        "tokens_packed": packed_tokens,
        "tokens_one_pass_per_followup": naive_tokens,
        "max_abs_diff_packed_vs_naive": float((packed - naive).abs().max()),
        "max_abs_diff_batched_vs_naive": float((batched_naive - naive).abs().max()),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "packed_gflops": round(packed_flops / t_packed / 1e9, 1),
        "one_pass_per_followup_gflops": round(naive_flops / t_naive / 1e9, 1),
        "packed_fraction_of_peak": round(packed_flops / t_packed / peak, 3),
    }
    save_results(result, args.json)


if __name__ == "__main__":
    main()
