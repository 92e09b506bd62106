"""A served model's single requests behind a shared start: CTranslate2 with and without the cross-call prefix cache.

`heedful serve` on CTranslate2 receives requests one (or a few) per call; MemPrompt's few-shot
examples (serving/stream_eval.py) put the same ~300 tokens in front of every one. With
`prefix_cache="across_calls"` (pipeline/ct2_engine.py) the start shared with the previous request
runs once. Both engines in one process, alternated per round, warm-up dropped; prints seconds for
the whole sequence of requests and whether every reply is the same.

    python bench/serve_prefix.py [--requests 16] [--rounds 2] [--max-new-tokens 16] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import ROOT, save_results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "serve_prefix.json")
    args = parser.parse_args()

    from pipeline.chat import render_many
    from pipeline.ct2_engine import Ct2Generator
    from pipeline.generation import SamplingSettings
    from serving.stream_eval import StreamEvalSettings, fewshot_messages

    start = fewshot_messages(StreamEvalSettings(model=args.model).template)
    engines = {
        "no_prefix_cache": Ct2Generator(args.model, prefix_cache=False),
        "across_calls": Ct2Generator(args.model, prefix_cache="across_calls"),
    }
    tokenizer = engines["no_prefix_cache"].tokenizer
    questions = [f"What is the synonym for word{i}?" for i in range(args.requests)]
    prompts = render_many(tokenizer, [start + [{"role": "user", "content": q}] for q in questions])
    greedy = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=0)
    for engine in engines.values():
        engine.generate_ids(prompts[:1], greedy)  # load (and convert, once) before timing
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    replies: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            began = time.perf_counter()
            replies[name] = [engine.generate_ids([p], greedy)[0][0] for p in prompts]
            seconds[name].append(time.perf_counter() - began)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    save_results(
        {
            "model": f"{args.model} (CTranslate2 float32, CPU)",
            "threads": os.cpu_count(),
            "requests": args.requests,
            "prompt_tokens": len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"]),
            "max_new_tokens": args.max_new_tokens,
            **{f"{name}_seconds": round(v, 3) for name, v in median.items()},
            "across_calls_time_vs_none": round(median["across_calls"] / median["no_prefix_cache"], 3),
            "same_replies": replies["across_calls"] == replies["no_prefix_cache"],
            "rounds": seconds,
            "load_average": round(os.getloadavg()[0], 1),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
