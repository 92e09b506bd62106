"""Benchmark: *sampled* generation tokens/s, heedful's paths vs plain HF `generate`, in one run.

The workload heedful runs most on a CPU is sampling, not greedy decoding: the `generate` stage's
replies to rank, simulated users' turns, held-out evaluations at a temperature. Arms, on the same
prompts in the same process (alternating which goes first per repetition, best of `--reps`):

- `hf`: plain HF `generate(do_sample=True, temperature, top_k=50, top_p=0.95)` on left-padded
  prompts, as a user writes it;
- `heedful_hf`: `pipeline.generation.chat_generate`, what the stages run where the engine is HF:
  the same model through HF `generate`, plus a batch's shared start computed once, decode steps on
  packed weights (pipeline/cpu_linear.py) and sampling from the top k only
  (pipeline/top_k_sampler.py);
- `ct2`: the CTranslate2 engine sampling with the same knobs (`--ct2`).

Sampled replies differ between arms by design (other random draws), so the bench reports each
arm's tokens/s on the tokens it actually wrote and its mean reply length beside it (a faster arm
that wrote shorter replies would show there). Greedy equality is bench/generate.py's business.
"""

from __future__ import annotations

import argparse
import os

from common import RESULTS, matmul_peak_flops, save_results
from generate import machine, prompts, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ct2", action="store_true", help="also time the CTranslate2 engine sampling")
    parser.add_argument("--out", default="sample.json", help="results file name under bench/results")
    args = parser.parse_args()

    import torch

    from pipeline.chat import render_many
    from pipeline.generation import SamplingSettings, chat_generate, eos_ids_from_tokenizer
    from pipeline.models import device_policy, load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model, padding_side="left")
    model = load_causal_lm(args.model, device_policy("cpu")).eval()
    eos_ids = eos_ids_from_tokenizer(tokenizer)
    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=50, top_p=0.95)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    conversations = [[{"role": "user", "content": p}] for p in prompts(max(sizes))]
    engine = None
    if args.ct2:
        from pipeline.ct2_engine import Ct2Generator

        engine = Ct2Generator(args.model, threads=args.threads)

    def plain_hf(convs, seed):
        torch.manual_seed(seed)
        texts = render_many(tokenizer, convs)  # the chat template, exactly as heedful renders it
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        return [_length(row.tolist(), eos_ids) for row in new]

    def heedful_hf(convs, seed):
        replies = chat_generate(model, tokenizer, convs, sampling, batch_size=len(convs), seed=seed)
        return [r[0].num_tokens + int(r[0].finished) for r in replies]

    def ct2(convs, seed):
        assert engine is not None
        replies = engine.generate(convs, sampling, seed=seed, batch_size=len(convs))
        return [r[0].num_tokens + int(r[0].finished) for r in replies]

    arms = {"hf": plain_hf, "heedful_hf": heedful_hf, **({"ct2": ct2} if engine else {})}
    result: dict = {
        "model": args.model,
        "threads": args.threads,
        "sampling": sampling.model_dump(),
        "machine": machine(),
        "matmul_peak_gflops": round(matmul_peak_flops() / 1e9, 1),
        "batches": [],
    }
    for fn in arms.values():  # warm-up: allocator, thread pools, the engine's conversion
        fn(conversations[:2], 0)
    for bs in sizes:
        convs = conversations[:bs]
        best: dict[str, tuple[float, float, int]] = {}
        for rep in range(args.reps):
            for name in list(arms) if rep % 2 == 0 else list(arms)[::-1]:
                lengths, wall, cpu = timed(arms[name], convs, rep)
                tokens = sum(lengths)
                if name not in best or tokens / wall > best[name][2] / best[name][0]:
                    best[name] = (wall, cpu, tokens)
        row: dict = {"batch": bs}
        for name, (wall, cpu, tokens) in best.items():
            row[f"{name}_tokens_per_s"] = round(tokens / wall, 1)
            row[f"{name}_tokens_per_cpu_s"] = round(tokens / cpu, 1)
            row[f"{name}_mean_tokens"] = round(tokens / bs, 1)
        for name in arms:
            if name != "hf":
                row[f"{name}_vs_hf"] = round(row[f"{name}_tokens_per_s"] / row["hf_tokens_per_s"], 2)
        print(row, flush=True)
        result["batches"].append(row)
    result["machine"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    save_results(result, RESULTS / args.out)


def _length(tokens: list[int], eos_ids: list[int]) -> int:
    """Tokens written up to and including the first end-of-turn token (padding after it is not work)."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return i + 1
    return len(tokens)


if __name__ == "__main__":
    main()
