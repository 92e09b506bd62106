"""Seconds per SFT step: heedful's FastSFTTrainer vs. TRL's SFTTrainer, in one run.

SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, 4 rows per step, ~256 tokens per row of
which the reply (the only tokens with a loss, TRL's completion_only_loss) is ~64, fp32 on CPU.
That is the shape of heedful's SFT uses: the `sft` stage (a prompt, the improved reply) and the
FLR fine-tune (a conversation, a short follow-up). Arms, each in a fresh process, order rotated
per round:

  plain  what a user writes with TRL: SFTConfig(bf16=False, use_cpu=True), TRL's other defaults
         (gradient checkpointing on; its fused LM head, which on a CPU scores every position)
  tuned  the same with gradient checkpointing off
  fast   trainers/fast_sft.FastSFTTrainer, checkpointing off: only the labelled positions through
         heedful's chunked head (the same loss and gradients, tests/test_fast_sft.py)

Per-step time is the median step (warm-up dropped), wall and process CPU. Also prints achieved
FLOP/s against a measured fp32 matmul peak: the arithmetic of a plain full-logits step (forward,
backward for activations, every position through the head) over each arm's seconds.

    python bench/sft_step.py [--steps 6] [--rounds 2] [--model tiny --tokens 64] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import QA, ROOT, matmul_peak_flops, save_results, step_timer

ARMS = ("plain", "tuned", "fast")


def make_rows(tokenizer, n: int, tokens: int, reply_tokens: int) -> list[dict]:
    """qa-feedback questions with their passages as prompt and an answer (then the passages) as
    reply, each cut to size: ~`tokens` per row, the last `reply_tokens` of them the reply."""
    rows = []
    for row in json.loads(QA.read_text()):
        context = " ".join(p[1] for p in row["passages"])
        prompt_ids = tokenizer(row["question"] + "\n" + context, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(row["prediction 1"] + " " + context, add_special_tokens=False)["input_ids"]
        room = tokens - reply_tokens - 12  # the chat template's tokens
        if len(prompt_ids) >= room and len(reply_ids) >= reply_tokens:
            prompt, reply = tokenizer.decode(prompt_ids[:room]), tokenizer.decode(reply_ids[:reply_tokens])
            rows.append(
                {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": reply}]}
            )
        if len(rows) == n:
            return rows
    raise RuntimeError("not enough long rows in qa-feedback")


def step_flops(config, tokens: int) -> float:
    """FLOPs of a plain LoRA step on one row: forward and backward (activation gradients) of the
    body and of the head at every position."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_token = layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * config.vocab_size
    return tokens * (2 * per_token + layers * 4 * tokens * d) * 2


def run_arm(arm: str, args) -> tuple[float, float]:
    """Median wall and CPU seconds per step of one arm, in this (fresh) process."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from pipeline.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = make_rows(tokenizer, args.rows, args.tokens, args.reply_tokens)
    timer = step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(
            output_dir=tmp,
            bf16=False,
            use_cpu=True,
            per_device_train_batch_size=len(rows),
            max_steps=args.steps,
            max_length=args.tokens + 16,
            completion_only_loss=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            gradient_checkpointing=arm == "plain",
        )
        kwargs = dict(
            model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
            args=cfg,
            train_dataset=Dataset.from_list(rows * args.steps),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        if arm == "fast":
            from trainers.fast_sft import FastSFTTrainer

            trainer: SFTTrainer = FastSFTTrainer(**kwargs)
            assert trainer.fast, trainer.fast_off_reason
        else:
            trainer = SFTTrainer(**kwargs)
        trainer.train()
    times, cpu = timer.wall, timer.cpu
    return statistics.median(times[1:] or times), statistics.median(cpu[1:] or cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reply-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="each arm once per round, in a fresh process, order rotated")
    parser.add_argument("--model", default="smollm2-135m", help="model alias or folder (tiny: a quick check that it runs)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "sft_step.json")
    args = parser.parse_args()
    if args.arm:
        wall, cpu = run_arm(args.arm, args)
        print("ARM", wall, cpu)
        return

    from transformers import AutoConfig

    from pipeline.models import resolve_model

    arms = [a for a in args.arms.split(",") if a]
    if unknown := sorted(set(arms) - set(ARMS)):
        parser.error(f"--arms: unknown {unknown}; choose from {','.join(ARMS)}")
    peak = matmul_peak_flops()
    flops = args.rows * step_flops(AutoConfig.from_pretrained(resolve_model(args.model)), args.tokens)
    walls: dict[str, list[float]] = {a: [] for a in arms}
    cpus: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.rounds):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            cmd = [sys.executable, __file__, "--arm", arm, "--model", args.model, "--steps", str(args.steps)]
            cmd += ["--rows", str(args.rows), "--tokens", str(args.tokens), "--reply-tokens", str(args.reply_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            wall, cpu = (float(x) for x in next(line for line in out.splitlines() if line.startswith("ARM ")).split()[1:])
            walls[arm].append(wall)
            cpus[arm].append(cpu)
            print(f"round {r + 1} {arm:6s} {wall:6.2f} s/step (CPU {cpu:6.2f} s)", flush=True)
    base = statistics.median(walls[arms[0]])
    print(f"\nfp32 matmul peak {peak / 1e9:.0f} GFLOP/s; {args.rows} rows x {args.tokens} tokens ({args.reply_tokens} reply)")
    result: dict = {"model": args.model, "rows": args.rows, "tokens": args.tokens, "reply_tokens": args.reply_tokens}
    result.update(peak_gflops=peak / 1e9, arms={})
    for arm in arms:
        wall = statistics.median(walls[arm])
        rate = flops / wall / 1e9
        print(
            f"{arm:6s} {wall:6.2f} s/step  {wall / base:5.2f}x {arms[0]}  {rate:5.1f} GFLOP/s ({100 * rate * 1e9 / peak:.0f}% of peak)"
        )
        result["arms"][arm] = {"seconds": walls[arm], "cpu_seconds": cpus[arm], "median": wall, "ratio": wall / base}
    save_results(result, args.json)


if __name__ == "__main__":
    main()
