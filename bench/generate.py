"""Benchmark: generation tokens/s, heedful's engine vs plain HF `generate`, in one run.

SmolLM2-135M-Instruct, greedy decoding, the chat template applied the same way. The heedful
arm is the CPU engine (CTranslate2, fp32, the shared chat-template prefix cached), which
`engine: auto` uses on a machine where its probe finds it faster than HF (pipeline/engine_probe.py);
`--int8` adds the opt-in int8 engine,
whose replies differ. Each batch size runs every arm on the same prompts in the same
process, alternating which arm goes first per repetition; the figure kept per arm is the
best of `--reps` (the least disturbed by other work on a shared machine), with the CPU
seconds the process spent in that repetition beside it (threads included).

A mixed-length workload (prompts of 5-80 words, each request its own budget of 16-128 new
tokens): plain HF serves it as a user would, in arrival order in batches of `--mixed-batch`,
each batch run to its longest budget; heedful's engine gets the whole queue at once, at most
`--mixed-batch` wide, each request leaving the batch at its own budget (CTranslate2 sorts the
queue by length). Only the tokens each request asked for count on both sides.
Greedy replies are compared token for token with HF's (`agreement`).
`--hf-packed` adds heedful's HF path as `chat_generate` runs it on a CPU: the same HF `generate`
with the decode steps' linear layers on oneDNN's packed weights (pipeline/cpu_linear.py).
`--hf-bf16` adds plain HF `generate` with the weights in bf16: what heedful's HF path computes in
on a CPU with bf16 units (pipeline/precision.py); the `hf` arm stays fp32 on every machine.
`--heedful-hf` adds heedful's HF path exactly as a stage runs it on this machine: `chat_generate`
(pipeline/generation.py) on the model in the host's precision (pipeline/precision.py: bf16 on a CPU
whose bf16 units pay, else fp32), packed weights in that precision, the shared chat-template prefix
run once per batch; its greedy replies are compared with HF fp32's as text.
`--llama-cpp f32,q8_0` adds llama.cpp arms on the embedded GGUF (bench/llama_cpp_arm.py; needs
llama-cpp-python, a source build): measured to decide whether it should be an engine.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

from common import RESULTS, matmul_peak_flops, save_results, steal_share, steal_since

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


def timed(fn, *args):
    """(fn(*args), wall seconds, CPU seconds of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def engine_arm(engine, texts, max_new_tokens, max_batch_size=None):
    """heedful's engine: `max_new_tokens` one budget for all or one per request."""
    from pipeline.generation import SamplingSettings

    budgets = max_new_tokens if isinstance(max_new_tokens, list) else None
    sampling = SamplingSettings(max_new_tokens=max(budgets) if budgets else max_new_tokens, temperature=0)
    width = max_batch_size or max(1, len(texts))
    return [s[0] for s in engine.generate_ids(texts, sampling, max_batch_size=width, max_new_tokens=budgets)]


def machine() -> dict:
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        text = open("/proc/cpuinfo").read()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    else:
        name = platform.processor()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f" {f}" in flags]
    return {
        "cpu": name,
        "isa": isa,
        "cores": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--mixed", type=int, default=64, help="requests in the mixed-length workload (0: skip it)")
    parser.add_argument("--mixed-batch", type=int, default=16)
    parser.add_argument("--int8", action="store_true", help="also time the opt-in int8 engine (replies differ)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-packed", action="store_true", help="also time HF generate with packed linear weights")
    parser.add_argument("--hf-bf16", action="store_true", help="also time HF generate with the weights in bf16")
    parser.add_argument("--heedful-hf", action="store_true", help="also time chat_generate in the host's precision")
    parser.add_argument("--out", default="generate.json", help="results file name under bench/results")
    parser.add_argument(
        "--llama-cpp",
        default="",
        help="also time llama.cpp on the embedded GGUF, comma-separated weight kinds: f32, q8_0 (bench/llama_cpp_arm.py)",
    )
    args = parser.parse_args()

    import torch

    from pipeline.chat import render_many
    from pipeline.ct2_engine import Ct2Generator, ct2_unavailable_reason, hf_greedy_reference
    from pipeline.generation import eos_ids_from_tokenizer
    from pipeline.models import device_policy, load_causal_lm, load_tokenizer
    from pipeline.precision import cpu_precision

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model, padding_side="left")
    model = load_causal_lm(args.model, device_policy("cpu", precision="float32")).eval()
    model_bf16 = load_causal_lm(args.model, device_policy("cpu", precision="bfloat16")).eval() if args.hf_bf16 else None
    host_precision = cpu_precision()
    model_host = load_causal_lm(args.model, device_policy("cpu", precision=host_precision)).eval() if args.heedful_hf else None
    eos_ids = eos_ids_from_tokenizer(tokenizer)  # what the engines stop on
    if reason := ct2_unavailable_reason():
        raise SystemExit(f"this benchmark times the CPU engine (CTranslate2) against HF generate: {reason}")
    engines = {"heedful": Ct2Generator(args.model, threads=args.threads)}
    if args.int8:
        engines["heedful_int8"] = Ct2Generator(args.model, quantization="int8", threads=args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.llama_cpp:
        engines.update(llama_cpp_engines(args, tokenizer, eos_ids, max([*sizes, args.mixed_batch])))
    all_conversations = [[{"role": "user", "content": p}] for p in prompts(max([*sizes, args.mixed]))]
    all_texts = render_many(tokenizer, all_conversations)

    stolen = steal_share()
    result: dict = {
        "model": args.model,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "machine": machine(),
        "matmul_peak_gflops": round(matmul_peak_flops() / 1e9, 1),
        "host_precision": host_precision,
        "batches": [],
    }
    # warm-up: first calls pay one-off costs (allocator, thread pools, the engine's prefix cache)
    hf_greedy_reference(model, tokenizer, all_texts[:2], 4, eos_ids)
    if args.hf_packed:
        hf_packed(model, tokenizer, all_texts[:2], 4, eos_ids)
    if model_bf16 is not None:
        hf_greedy_reference(model_bf16, tokenizer, all_texts[:2], 4, eos_ids)
    if model_host is not None:
        heedful_hf(model_host, tokenizer, all_conversations[:2], 4)
    for engine in engines.values():
        engine_arm(engine, all_texts[:2], 4)
    for bs in sizes:
        texts = all_texts[:bs]
        best: dict[str, tuple[float, float]] = {}
        tokens: dict[str, int] = {}
        replies: dict[str, list] = {}
        hf_arms = ["hf", *(["hf_packed"] if args.hf_packed else []), *(["hf_bf16"] if args.hf_bf16 else [])]
        hf_arms += ["heedful_hf"] if args.heedful_hf else []
        for rep in range(args.reps):
            order = [*hf_arms, *engines] if rep % 2 == 0 else [*engines, *hf_arms[::-1]]
            for arm in order:
                if arm == "hf":
                    out, wall, cpu = timed(hf_greedy_reference, model, tokenizer, texts, args.max_new_tokens, eos_ids)
                elif arm == "hf_packed":
                    out, wall, cpu = timed(hf_packed, model, tokenizer, texts, args.max_new_tokens, eos_ids)
                elif arm == "hf_bf16":
                    out, wall, cpu = timed(hf_greedy_reference, model_bf16, tokenizer, texts, args.max_new_tokens, eos_ids)
                elif arm == "heedful_hf":
                    out, wall, cpu = timed(heedful_hf, model_host, tokenizer, all_conversations[:bs], args.max_new_tokens)
                else:
                    out, wall, cpu = timed(engine_arm, engines[arm], texts, args.max_new_tokens)
                replies[arm], tokens[arm] = out, sum(len(r) for r in out)
                if wall < best.get(arm, (float("inf"), 0.0))[0]:
                    best[arm] = (wall, cpu)
        row: dict = {"batch": bs, "agreement_greedy": sum(a == b for a, b in zip(replies["hf"], replies["heedful"])) / bs}
        for arm in [*engines, *hf_arms[1:]]:
            if arm == "heedful_hf":  # text against HF's decoded replies
                hf_text = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies["hf"]]
                row[f"{arm}_agreement"] = sum(a == b.text for a, b in zip(hf_text, replies[arm])) / bs
            elif arm.startswith("llama_cpp") or arm in ("hf_packed", "hf_bf16"):
                row[f"{arm}_agreement"] = sum(a == b for a, b in zip(replies["hf"], replies[arm])) / bs
        for arm, (wall, cpu) in best.items():
            row[f"{arm}_tokens"] = tokens[arm]
            row[f"{arm}_tokens_per_s"] = round(tokens[arm] / wall, 1)
            row[f"{arm}_tokens_per_cpu_s"] = round(tokens[arm] / cpu, 1)
        for arm in [*engines, *hf_arms[1:]]:
            row[f"{arm}_vs_hf"] = round(row[f"{arm}_tokens_per_s"] / row["hf_tokens_per_s"], 2)
            row[f"{arm}_vs_hf_cpu"] = round(row[f"{arm}_tokens_per_cpu_s"] / row["hf_tokens_per_cpu_s"], 2)
        print(row, flush=True)
        result["batches"].append(row)

    if args.mixed:
        served = {"hf": model, "hf_bf16": model_bf16, "heedful_hf": model_host}
        served = {arm: m for arm, m in served.items() if m is not None}
        conversations = all_conversations[: args.mixed]
        result["mixed"] = mixed_workload(args, tokenizer, eos_ids, engines, all_texts[: args.mixed], conversations, served)
    result["machine"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["machine"]["steal_share"] = steal_since(stolen)  # a VM host's other guests: not the machine's own figures
    save_results(result, RESULTS / args.out)


def hf_packed(model, tokenizer, texts, max_new_tokens, eos_ids):
    """HF greedy generate, the decode steps' linear layers on packed weights."""
    from pipeline.cpu_linear import packed_linears
    from pipeline.ct2_engine import hf_greedy_reference

    with packed_linears(model):
        return hf_greedy_reference(model, tokenizer, texts, max_new_tokens, eos_ids)


class _Reply(list):
    """A `chat_generate` reply counted like a token list (its length: the reply's tokens)."""

    def __init__(self, completion):
        super().__init__(range(completion.num_tokens))
        self.text = completion.text


def heedful_hf(model, tokenizer, conversations, max_new_tokens):
    """heedful's HF path as a stage runs it: `chat_generate`, greedy, the conversations in one batch."""
    from pipeline.generation import SamplingSettings, chat_generate

    greedy = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
    return [_Reply(r[0]) for r in chat_generate(model, tokenizer, conversations, greedy, batch_size=len(conversations))]


def llama_cpp_engines(args, tokenizer, eos_ids, slots: int) -> dict:
    """llama.cpp arms on the embedded GGUF rewritten as each asked weight kind."""
    from llama_cpp_arm import LlamaCppGreedy, gguf_copy, unavailable_reason

    from pipeline.models import _gguf_location

    if args.model != "smollm2-135m":
        raise SystemExit("--llama-cpp needs --model smollm2-135m (the one model shipped as a GGUF)")
    if reason := unavailable_reason():
        raise SystemExit(f"--llama-cpp: {reason}")
    out = {}
    for kind in args.llama_cpp.split(","):
        gguf = gguf_copy(_gguf_location(), kind, RESULTS / "gguf")
        out[f"llama_cpp_{kind}"] = LlamaCppGreedy(gguf, tokenizer, eos_ids, args.threads, slots=slots)
    return out


def mixed_workload(args, tokenizer, eos_ids, engines, texts, conversations, models) -> dict:
    """Every request its own budget. `models` (arm -> model: `hf`, and `hf_bf16`, `heedful_hf` when
    asked) serve it in arrival-order batches of `--mixed-batch`, each batch run to its longest
    budget (`chat_generate`, heedful's HF path, has one budget per call too); heedful's engine gets
    the queue, each request leaving at its own budget. Only the tokens each request asked for count."""
    from pipeline.ct2_engine import hf_greedy_reference

    rng = random.Random(1)
    budgets = [rng.choice([16, 32, 64, 128]) for _ in texts]
    out: dict = {"requests": len(texts), "batch": args.mixed_batch}

    def in_batches(items, generate):
        n = 0
        for start in range(0, len(items), args.mixed_batch):
            chunk, asked = items[start : start + args.mixed_batch], budgets[start : start + args.mixed_batch]
            n += sum(min(len(r), b) for r, b in zip(generate(chunk, max(asked)), asked))
        return n

    for arm in [*models, *engines]:
        if arm == "heedful_hf":
            n, wall, cpu = timed(in_batches, conversations, lambda c, k, m=models[arm]: heedful_hf(m, tokenizer, c, k))
        elif arm in models:
            n, wall, cpu = timed(in_batches, texts, lambda c, k, m=models[arm]: hf_greedy_reference(m, tokenizer, c, k, eos_ids))
        else:
            replies, wall, cpu = timed(engine_arm, engines[arm], texts, budgets, args.mixed_batch)
            n = sum(len(r) for r in replies)
        out[arm] = {"tokens": n, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "tokens_per_s": round(n / wall, 1)}
        print(arm, out[arm], flush=True)
    for arm in [*models, *engines]:
        if arm != "hf":
            out[arm]["vs_hf"] = round(out[arm]["tokens_per_s"] / out["hf"]["tokens_per_s"], 2)
    return out


if __name__ == "__main__":
    main()
