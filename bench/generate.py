"""Benchmark: generation tokens/s, heedful's CPU engine (CTranslate2) vs plain HF `generate`.

SmolLM2-135M-Instruct, fp32 on both sides (the ct2 engine also int8 when `--int8`), greedy
decoding, the chat template applied the same way. Each batch size (1, 8, 32, 64) runs both
arms on the same prompts in the same process, alternating which arm goes first per
repetition; the figure kept per arm is the best of `--reps` (the least disturbed by other
work on a shared machine). A mixed-length workload (prompts of 5-80 words asking for
replies of different lengths, max_new_tokens 16-128 by request) is served in arrival order in
batches of `--mixed-batch` by both arms; only the tokens each request asked for count
(a batch runs to its longest budget on both sides). Greedy replies are compared token for token between the arms (`agreement`).
"""

from __future__ import annotations

import argparse
import random
import time

from common import RESULTS, matmul_peak_flops, save_results

TOPICS = [
    "tea",
    "bridges",
    "volcanoes",
    "chess",
    "bread",
    "rivers",
    "comets",
    "violins",
    "bees",
    "glaciers",
    "printing",
    "tides",
    "owls",
    "copper",
    "maps",
    "sourdough",
]


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        padding = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(0, 70)))
        ask = rng.choice(["in one sentence", "in a short paragraph", "in three bullet points", "in detail"])
        out.append(f"Explain {topic} {ask}." + (f" Context words: {padding}." if padding else ""))
    return out


def hf_arm(model, tokenizer, texts, max_new_tokens, eos_ids):
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
        )
    seconds = time.perf_counter() - start
    replies = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        cut = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
        replies.append(row[:cut])
    return seconds, replies


def ct2_arm(engine, texts, max_new_tokens):
    from pipeline.generation import SamplingSettings

    sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
    start = time.perf_counter()
    replies = [samples[0] for samples in engine.generate_ids(texts, sampling, max_batch_size=max(1, len(texts)))]
    seconds = time.perf_counter() - start
    return seconds, replies, [len(r) for r in replies]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--mixed", type=int, default=64, help="requests in the mixed-length workload")
    parser.add_argument("--mixed-batch", type=int, default=16)
    parser.add_argument("--int8", action="store_true", help="also time the engine with int8 weights")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from pipeline.chat import render_many
    from pipeline.ct2_engine import Ct2Generator
    from pipeline.generation import eos_ids_from_tokenizer
    from pipeline.models import device_policy, load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model, padding_side="left")
    model = load_causal_lm(args.model, device_policy("cpu")).eval()
    eos_ids = eos_ids_from_tokenizer(tokenizer)  # what the engines stop on
    engines = {"ct2_fp32": Ct2Generator(args.model, threads=args.threads)}
    if args.int8:
        engines["ct2_int8"] = Ct2Generator(args.model, quantization="int8", threads=args.threads)
    all_texts = render_many(tokenizer, [[{"role": "user", "content": p}] for p in prompts(max(64, args.mixed))])

    result: dict = {
        "model": args.model,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "matmul_peak_gflops": round(matmul_peak_flops() / 1e9, 1),
        "batches": [],
    }
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        texts = all_texts[:bs]
        best: dict[str, float] = {}
        tokens: dict[str, int] = {}
        for rep in range(args.reps):
            order = ["hf", *engines] if rep % 2 == 0 else [*engines, "hf"]
            for arm in order:
                if arm == "hf":
                    seconds, replies = hf_arm(model, tokenizer, texts, args.max_new_tokens, eos_ids)
                    n = sum(len(r) for r in replies)
                    hf_replies = replies
                else:
                    seconds, ct_replies, counts = ct2_arm(engines[arm], texts, args.max_new_tokens)
                    n = sum(counts)
                    if arm == "ct2_fp32":
                        fp32_replies = ct_replies
                tokens[arm] = n
                best[arm] = min(best.get(arm, float("inf")), seconds)
        agreement = sum(a == b for a, b in zip(hf_replies, fp32_replies)) / len(texts)
        row = {"batch": bs, "agreement_greedy_fp32": agreement}
        for arm in best:
            row[f"{arm}_tokens_per_s"] = round(tokens[arm] / best[arm], 1)
        for arm in engines:
            row[f"{arm}_vs_hf"] = round(row[f"{arm}_tokens_per_s"] / row["hf_tokens_per_s"], 2)
        print(row, flush=True)
        result["batches"].append(row)

    # mixed-length workload: every request its own length budget, served in arrival order
    rng = random.Random(1)
    budgets = [rng.choice([16, 32, 64, 128]) for _ in range(args.mixed)]
    texts = all_texts[: args.mixed]
    mixed: dict[str, dict] = {}
    for arm in ["hf", *engines]:
        total_tokens, total_seconds = 0, 0.0
        for start in range(0, args.mixed, args.mixed_batch):
            chunk = texts[start : start + args.mixed_batch]
            budget = max(budgets[start : start + args.mixed_batch])
            if arm == "hf":
                seconds, replies = hf_arm(model, tokenizer, chunk, budget, eos_ids)
                n = sum(min(len(r), b) for r, b in zip(replies, budgets[start : start + args.mixed_batch]))
            else:
                seconds, _, counts = ct2_arm(engines[arm], chunk, budget)
                n = sum(min(c, b) for c, b in zip(counts, budgets[start : start + args.mixed_batch]))
            total_tokens += n
            total_seconds += seconds
        mixed[arm] = {
            "tokens": total_tokens,
            "seconds": round(total_seconds, 2),
            "tokens_per_s": round(total_tokens / total_seconds, 1),
        }
    for arm in engines:
        mixed[arm]["vs_hf"] = round(mixed[arm]["tokens_per_s"] / mixed["hf"]["tokens_per_s"], 2)
    result["mixed"] = {"requests": args.mixed, "batch": args.mixed_batch, **mixed}
    save_results(result, RESULTS / "generate.json")


if __name__ == "__main__":
    main()
