"""Seconds per DPO step: heedful vs. plain TRL, in one run.

SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, 4 pairs per step, ~256 tokens per
sequence (prompt + reply), fp32 on CPU. Arms, each in a fresh process, order rotated per round:

  plain       what a user writes with TRL: DPOConfig(bf16=False, use_cpu=True), TRL's other
              defaults (gradient checkpointing on, reference forward every step)
  tuned       the same with gradient checkpointing off
  precompute  tuned + precompute_ref_log_probs=True (the strongest plain-TRL setting we know)
  fast        heedful's preference core (trainers/fastpref: packed pairs, chunked log-probs,
              cached reference, checkpointing chosen by a per-host probe), cold reference cache
  heedful     the `dpo` stage end to end, as configured (the fast core), in fp32 like the arms above,
              its reference cache cold like `fast`'s (a rerun of the same pairs would find it cached)
  precompute_bf16, fast_bf16
              the same in bf16 (weights loaded in bf16, DPOConfig(bf16=True): autocast), for
              CPUs with bf16 units, where heedful computes in bf16 (pipeline/precision.py); the
              issue's target is stated for fp32, so these are a second comparison, not the target's

Per-step time = median step (warm-up dropped) + the reference precompute/cache time divided
by the number of steps, so a cold cache's cost is amortized over the run as it happens. The same
is recorded in process CPU seconds (both threads), which a shared machine disturbs less than wall time.

Run length: one epoch is `--steps` steps over `--steps x --pairs` pairs. `--epochs N` runs the arms
that compute their reference once (precompute, fast, heedful and their bf16 twins) for N epochs over
the same pairs, as a run of N epochs happens: the reference is computed once and every step of
every epoch counts, so its cost is amortized over N x steps. TRL's default run is 3 epochs
(`num_train_epochs=3`). Those arms also report the one-epoch figure from the same run (median step +
reference / steps). Arms that compute the reference inside every step (plain, tuned) cost the same
per step however long the run, so they run one epoch.
Also prints achieved FLOP/s against a measured fp32 matmul peak of this machine: plain TRL's
arithmetic per step (a reference forward included) over each arm's seconds, so an effective rate
that rises for the arms that compute the reference once as the run gets longer.

    python bench/dpo_step.py [--steps 6] [--rounds 2] [--model tiny --tokens 64] [--arms fast,plain]
        [--json bench/results/dpo_step.json]
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

from common import QA, ROOT, matmul_peak_flops, save_results, steal_share, steal_since, step_timer


def chat_tokens(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> int:
    """Tokens of `messages` under the model's chat template."""
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)["input_ids"])


def make_pairs(tokenizer, n_pairs: int, target_tokens: int) -> list[dict]:
    """Real text (qa-feedback questions and answers) trimmed so each sequence is ~target_tokens."""
    rows = json.loads(QA.read_text())
    pairs = []
    for row in rows:
        prompt = row["question"]
        preds = [row["prediction 1"], row["prediction 2"]]
        prompt_msgs = [{"role": "user", "content": prompt}]
        prompt_len = chat_tokens(tokenizer, prompt_msgs, add_generation_prompt=True)
        budget = target_tokens - prompt_len - 2
        replies = []
        for text in preds:
            ids = tokenizer(text + " " + " ".join(p[1] for p in row["passages"]), add_special_tokens=False)["input_ids"]
            if len(ids) < budget:
                break
            replies.append(tokenizer.decode(ids[:budget]))
        if len(replies) == 2:
            pairs.append(
                {
                    "prompt": prompt_msgs,
                    "chosen": [{"role": "assistant", "content": replies[0]}],
                    "rejected": [{"role": "assistant", "content": replies[1]}],
                }
            )
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


def step_times_trl(
    model_path: str,
    pairs: list[dict],
    steps: int,
    out: Path,
    checkpointing: bool = True,
    precompute: bool = False,
    fast: bool = False,
    bf16: bool = False,
    epochs: int = 1,
) -> tuple[list[float], float, list[float], float]:
    """Step times of a TRL-style script (DPOTrainer, or heedful's FastDPOTrainer with `fast`) and
    the seconds it spent computing reference log-probs up front (precompute or cache); wall, then CPU."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    timer = step_timer()
    precomputed: list[float] = []
    precomputed_cpu: list[float] = []

    def timed(compute):
        start, cpu = time.perf_counter(), time.process_time()
        result = compute()
        precomputed.append(time.perf_counter() - start)
        precomputed_cpu.append(time.process_time() - cpu)
        return result

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            return timed(lambda: super(TimedDPOTrainer, self)._precompute_ref_logps(*a, **k))

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="bfloat16" if bf16 else "float32")
    args = DPOConfig(
        output_dir=str(out),
        bf16=bf16,
        use_cpu=True,
        per_device_train_batch_size=len(pairs),  # one step is the `--pairs` pairs
        max_steps=steps * epochs,  # one epoch is `steps` steps over the dataset below
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        gradient_checkpointing=checkpointing,
        precompute_ref_log_probs=precompute,
    )
    kwargs = dict(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs * steps),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    if fast:
        from trainers.fastpref.trainer import FastDPOTrainer

        class TimedFastDPOTrainer(FastDPOTrainer):
            def _compute_ref_logps(self, *a, **k):
                return timed(lambda: super(TimedFastDPOTrainer, self)._compute_ref_logps(*a, **k))

        trainer: DPOTrainer = TimedFastDPOTrainer(
            **kwargs, ref_cache_dir=out / "ref_cache", probe_checkpointing=True, model_name=Path(model_path).name
        )
        assert isinstance(trainer, FastDPOTrainer) and trainer.fast, getattr(trainer, "fast_off_reason", None)
        print("FAST_CHECKPOINTING", trainer.checkpointing_chosen, flush=True)
    else:
        trainer = TimedDPOTrainer(**kwargs)
    trainer.train()
    return timer.wall, sum(precomputed), timer.cpu, sum(precomputed_cpu)


def step_times_heedful(pairs: list[dict], steps: int, work: Path, model: str, epochs: int = 1) -> tuple[float, float | None]:
    """The stage's median step + its reference seconds amortized over the run, and for a run of
    several epochs the same amortized over one epoch."""
    from pipeline.config import pipeline_from_dict
    from pipeline.records import write_jsonl
    from pipeline.runner import Runner

    write_jsonl(pairs * steps, work / "pairs.jsonl")
    data = {
        "run_name": "bench",
        "model": model,
        "stages": [
            {
                "name": "align",
                "uses": "dpo",
                "inputs": {"preferences": str(work / "pairs.jsonl")},
                "with": {
                    "max_steps": steps * epochs,
                    "per_device_train_batch_size": len(pairs),
                    "max_length": 1024,
                    "save_steps": 10_000,
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                },
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, work), work / "runs", use_ray=False).execute()
    assert result.ok, result.records
    metrics = result.record("align").metrics
    # as for the other arms: the median step + the reference computation amortized over the steps
    step, reference = metrics["seconds_per_step"], metrics.get("reference_seconds", 0.0)
    return step + reference / (steps * epochs), (step + reference / steps if epochs > 1 else None)


ARMS = ("heedful", "plain", "tuned", "precompute", "fast", "precompute_bf16", "fast_bf16")


#: the arms that compute their reference log-probs once per run (before the first step), not in every step
REFERENCE_ONCE = ("heedful", "precompute", "fast", "precompute_bf16", "fast_bf16")


def run_arm(arm: str, args) -> tuple[float, float | None, float | None]:
    """One arm in this (fresh) process: its median seconds per step, reference cost amortized over the
    run; wall and CPU; and, for a run of several epochs, the wall figure amortized over one epoch."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve_model(args.model)
    pairs = make_pairs(AutoTokenizer.from_pretrained(path), args.pairs, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        if arm == "heedful":  # fp32 like the other arms without _bf16, whatever this CPU would pick
            os.environ["HEEDFUL_CPU_PRECISION"] = "fp32"
            # a cold reference cache, as the `fast` arm's: the stage's default cache outlives runs, and
            # an earlier run of these pairs would leave nothing to compute (a rerun's cost, not a first run's)
            import trainers.fastpref.ref_cache as ref_cache

            ref_cache.default_root = lambda: Path(tmp) / "ref_cache"
            wall, one_epoch = step_times_heedful(pairs, args.steps, Path(tmp), args.model, args.epochs)
            return wall, None, one_epoch
        times, ref_seconds, cpu_times, ref_cpu = step_times_trl(
            path,
            pairs,
            args.steps,
            Path(tmp) / arm,
            checkpointing=arm == "plain",
            precompute=arm.startswith("precompute"),
            fast=arm.startswith("fast"),
            bf16=arm.endswith("_bf16"),
            epochs=args.epochs if arm in REFERENCE_ONCE else 1,
        )
        n = max(len(times), 1)  # drop the warm-up step, amortize the reference over every step
        step, cpu_step = statistics.median(times[1:] or times), statistics.median(cpu_times[1:] or cpu_times)
        one_epoch = step + ref_seconds / args.steps if n > args.steps else None
        return step + ref_seconds / n, cpu_step + ref_cpu / n, one_epoch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument(
        "--epochs", type=int, default=1, help="run length of the arms that compute the reference once (TRL's default: 3)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="each arm runs once per round, in a fresh process, order rotated")
    parser.add_argument("--model", default="smollm2-135m", help="model alias or folder (tiny: a quick check that it runs)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "dpo_step.json")
    args = parser.parse_args()
    if args.arm:
        wall, cpu, one_epoch = run_arm(args.arm, args)
        print("ARM_SECONDS_PER_STEP", wall)
        if cpu is not None:
            print("ARM_CPU_SECONDS_PER_STEP", cpu)
        if one_epoch is not None:
            print("ARM_ONE_EPOCH_SECONDS_PER_STEP", one_epoch)
        return

    import subprocess

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.models import resolve_model

    arms = tuple(a for a in args.arms.split(",") if a)
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {','.join(ARMS)}")
    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = make_pairs(tokenizer, args.pairs, args.tokens)
    lengths = []
    for pair in pairs:
        for side in ("chosen", "rejected"):
            lengths.append(chat_tokens(tokenizer, pair["prompt"] + pair[side]))
    peak = matmul_peak_flops()
    flops = dpo_step_flops(AutoConfig.from_pretrained(path), lengths)

    # Each arm in its own process, order rotated each round: this shared 2-core machine's
    # speed drifts by tens of percent over minutes, so one pass in one order is not a comparison.
    per_arm: dict[str, list[float]] = {arm: [] for arm in arms}
    per_arm_cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    per_arm_one_epoch: dict[str, list[float]] = {arm: [] for arm in arms}
    loads: list[float] = []
    steals: list[float | None] = []  # the share of each arm's CPU time a VM host gave to other guests
    for r in range(args.rounds):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            cmd = [
                sys.executable,
                __file__,
                "--arm",
                arm,
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--pairs",
                str(args.pairs),
                "--tokens",
                str(args.tokens),
                "--epochs",
                str(args.epochs),
            ]
            stolen_from = steal_share()
            run = subprocess.run(cmd, capture_output=True, text=True)
            steals.append(steal_since(stolen_from))
            if run.returncode != 0:
                sys.exit(f"arm {arm} failed:\n{run.stderr[-4000:]}")
            lines = run.stdout.splitlines()
            seconds = float(next(line.split()[1] for line in lines if line.startswith("ARM_SECONDS_PER_STEP")))
            cpu = next((float(line.split()[1]) for line in lines if line.startswith("ARM_CPU_SECONDS_PER_STEP")), None)
            one_epoch = next((float(x.split()[1]) for x in lines if x.startswith("ARM_ONE_EPOCH_SECONDS_PER_STEP")), None)
            if one_epoch is not None:
                per_arm_one_epoch[arm].append(one_epoch)
            extra = next((f" (checkpointing {line.split()[1]})" for line in lines if line.startswith("FAST_CHECKPOINTING")), "")
            per_arm[arm].append(seconds)
            if cpu is not None:
                per_arm_cpu[arm].append(cpu)
            loads.append(os.getloadavg()[0])
            cpu_text = f", {cpu:.3f} CPU s/step" if cpu is not None else ""
            steal = f", {steals[-1]:.0%} stolen" if steals[-1] is not None else ""
            epoch_text = f", one epoch {one_epoch:.3f} s/step" if one_epoch is not None else ""
            print(
                f"round {r + 1}: {arm}: {seconds:.3f} s/step{cpu_text}{epoch_text}{extra} (load {loads[-1]:.1f}{steal})",
                flush=True,
            )
    median = {arm: statistics.median(v) for arm, v in per_arm.items()}
    median_cpu = {arm: statistics.median(v) for arm, v in per_arm_cpu.items() if v}
    names = {
        "plain": "plain_trl",
        "tuned": "plain_trl_no_checkpointing",
        "precompute": "plain_trl_precompute_ref",
        "fast": "heedful_fast_core",
        "heedful": "heedful_stage",
        "precompute_bf16": "plain_trl_precompute_ref_bf16",
        "fast_bf16": "heedful_fast_core_bf16",
    }

    result: dict = {
        "model": f"{args.model} (fp32, CPU; the _bf16 arms in bf16)",
        "threads": torch.get_num_threads(),
        "pairs_per_step": args.pairs,
        "steps": args.steps,
        "epochs_of_the_arms_that_compute_the_reference_once": args.epochs,
        "tokens_per_sequence": lengths,
        **{f"{names[a]}_seconds_per_step": round(v, 4) for a, v in median.items()},
        "rounds_seconds_per_step": per_arm,
        **{f"{names[a]}_cpu_seconds_per_step": round(v, 4) for a, v in median_cpu.items()},
        "rounds_cpu_seconds_per_step": {a: v for a, v in per_arm_cpu.items() if v},
        "load_average_after_each_arm": [round(x, 1) for x in loads],
        "steal_share_each_arm": steals,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "step_gflop": round(flops / 1e9, 2),
        **{f"{names[a]}_gflops": round(flops / v / 1e9, 2) for a, v in median.items()},
    }
    one_epoch_median = {arm: statistics.median(v) for arm, v in per_arm_one_epoch.items() if v}
    if one_epoch_median:  # the same runs, their reference amortized over one epoch only
        result["one_epoch_seconds_per_step"] = {names[a]: round(v, 4) for a, v in one_epoch_median.items()}
        for ours in ("fast", "heedful", "fast_bf16"):
            for base in ("plain", "tuned", "precompute", "precompute_bf16"):
                if ours in one_epoch_median and base in median:
                    baseline = one_epoch_median.get(base, median[base])
                    result[f"one_epoch_speedup_{names[ours]}_vs_{names[base]}"] = round(baseline / one_epoch_median[ours], 3)
    for ours in ("fast", "heedful", "fast_bf16"):
        for base in ("plain", "tuned", "precompute", "precompute_bf16"):
            if ours in median and base in median:
                result[f"speedup_{names[ours]}_vs_{names[base]}"] = round(median[base] / median[ours], 3)
            if ours in median_cpu and base in median_cpu:
                result[f"cpu_speedup_{names[ours]}_vs_{names[base]}"] = round(median_cpu[base] / median_cpu[ours], 3)
    save_results(result, args.json)


if __name__ == "__main__":
    main()
