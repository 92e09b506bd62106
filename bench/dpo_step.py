"""Seconds per DPO step: heedful's `dpo` stage vs. a plain TRL script, in one run.

SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, 4 pairs per step, ~256 tokens per
sequence (prompt + reply), fp32 on CPU. The baseline is what a user would write with TRL:
DPOConfig(bf16=False, use_cpu=True) and TRL's other defaults (gradient checkpointing on); and the
strongest plain-TRL setting we know on CPU, the same with gradient checkpointing off.
Also prints achieved FLOP/s against a measured fp32 matmul peak of this machine.

    python bench/dpo_step.py [--steps 6] [--rounds 2] [--json bench/results/dpo_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import QA, ROOT, matmul_peak_flops, save_results


def make_pairs(tokenizer, n_pairs: int, target_tokens: int) -> list[dict]:
    """Real text (qa-feedback questions and answers) trimmed so each sequence is ~target_tokens."""
    rows = json.loads(QA.read_text())
    pairs = []
    for row in rows:
        prompt = row["question"]
        preds = [row["prediction 1"], row["prediction 2"]]
        prompt_msgs = [{"role": "user", "content": prompt}]
        prompt_len = len(tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
        budget = target_tokens - prompt_len - 2
        replies = []
        for text in preds:
            ids = tokenizer(text + " " + " ".join(p[1] for p in row["passages"]), add_special_tokens=False)["input_ids"]
            if len(ids) < budget:
                break
            replies.append(tokenizer.decode(ids[:budget]))
        if len(replies) == 2:
            pairs.append({"prompt": prompt_msgs, "chosen": [{"role": "assistant", "content": replies[0]}],
                          "rejected": [{"role": "assistant", "content": replies[1]}]})
        if len(pairs) == n_pairs:
            return pairs
    raise RuntimeError("not enough long rows in qa-feedback")



def dpo_step_flops(config, tokens_per_seq: list[int]) -> float:
    """Useful FLOPs of one LoRA-DPO step: policy fwd+bwd (input grads) + reference fwd."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_token_params = layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * config.vocab_size
    total = 0.0
    for t in tokens_per_seq:
        attn = layers * 2 * 2 * t * d  # QK^T and AV, per token, averaged over causal positions ~ t/2 * 2
        fwd = 2 * per_token_params + attn
        total += t * (fwd * 2 + fwd)  # policy forward + backward (~1x fwd for activation grads) + reference forward
    return total


def step_times_plain_trl(model_path: str, pairs: list[dict], steps: int, out: Path, checkpointing: bool = True) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    args = DPOConfig(output_dir=str(out), bf16=False, use_cpu=True, per_device_train_batch_size=4, max_steps=steps,
                     report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                     gradient_checkpointing=checkpointing)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs * steps), processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"), callbacks=[Timer()])
    trainer.train()
    return times


def step_times_heedful(pairs: list[dict], steps: int, work: Path) -> list[float]:
    from pipeline.config import pipeline_from_dict
    from pipeline.records import write_jsonl
    from pipeline.runner import Runner

    write_jsonl(pairs * steps, work / "pairs.jsonl")
    data = {"run_name": "bench", "model": "smollm2-135m", "stages": [
        {"name": "align", "uses": "dpo", "inputs": {"preferences": str(work / "pairs.jsonl")},
         "with": {"max_steps": steps, "per_device_train_batch_size": 4, "max_length": 1024, "save_steps": 10_000,
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.05}}}]}
    result = Runner(pipeline_from_dict(data, work), work / "runs", use_ray=False).execute()
    assert result.ok, result.records
    return [result.record("align").metrics["seconds_per_step"]]


ARMS = ("heedful", "plain", "tuned")


def run_arm(arm: str, args) -> float:
    """One arm in this (fresh) process: its median seconds per step."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.models import prepare_smollm2

    torch.set_num_threads(os.cpu_count() or 1)
    path = str(prepare_smollm2())
    pairs = make_pairs(AutoTokenizer.from_pretrained(path), args.pairs, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        if arm == "heedful":
            return step_times_heedful(pairs, args.steps, Path(tmp))[0]  # already a median
        times = step_times_plain_trl(path, pairs, args.steps, Path(tmp) / arm, checkpointing=arm == "plain")
        return statistics.median(times[1:])  # drop the warm-up step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="each arm runs once per round, in a fresh process, order rotated")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "dpo_step.json")
    args = parser.parse_args()
    if args.arm:
        print("ARM_SECONDS_PER_STEP", run_arm(args.arm, args))
        return

    import subprocess

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.models import prepare_smollm2

    torch.set_num_threads(os.cpu_count() or 1)
    path = str(prepare_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = make_pairs(tokenizer, args.pairs, args.tokens)
    lengths = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            lengths.append(len(tokenizer.apply_chat_template(p["prompt"] + p[side], tokenize=True)["input_ids"]))
    peak = matmul_peak_flops()
    flops = dpo_step_flops(AutoConfig.from_pretrained(path), lengths)

    # Each arm in its own process, order rotated each round: this shared 2-core machine's
    # speed drifts by tens of percent over minutes, so one pass in one order is not a comparison.
    per_arm: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]:
            cmd = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps), "--pairs", str(args.pairs),
                   "--tokens", str(args.tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            seconds = float(next(line.split()[1] for line in out.splitlines() if line.startswith("ARM_SECONDS_PER_STEP")))
            per_arm[arm].append(seconds)
            print(f"round {r + 1}: {arm}: {seconds:.2f} s/step", flush=True)
    heedful_s, plain_s, tuned_s = (statistics.median(per_arm[a]) for a in ARMS)

    result = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "threads": torch.get_num_threads(),
        "pairs_per_step": args.pairs,
        "tokens_per_sequence": lengths,
        "plain_trl_seconds_per_step": round(plain_s, 3),
        "heedful_seconds_per_step": round(heedful_s, 3),
        "speedup": round(plain_s / heedful_s, 3),
        "plain_trl_no_checkpointing_seconds_per_step": round(tuned_s, 3),
        "speedup_vs_no_checkpointing": round(tuned_s / heedful_s, 3),
        "rounds_seconds_per_step": per_arm,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "step_gflop": round(flops / 1e9, 1),
        "plain_trl_gflops": round(flops / plain_s / 1e9, 1),
        "heedful_gflops": round(flops / heedful_s / 1e9, 1),
        "heedful_fraction_of_peak": round(flops / heedful_s / peak, 3),
    }
    save_results(result, args.json)


if __name__ == "__main__":
    main()
