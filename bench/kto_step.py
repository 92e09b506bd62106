"""KTO per run: TRL's KTOTrainer (with and without its precompute) against heedful's packed KTO core.

heedful's `kto` stage runs KTO on the packed preference core (trainers/fastpref/kto_trainer.py):
replies and mismatched KL replies packed after their prompts without padding, log-probs at the
reply tokens only in vocabulary tiles, the reference's log-probs of both from an on-disk cache
computed once (each row as [prompt | reply | KL reply], the prompt once). TRL's KTOTrainer computes the reference inside every step unless it
precomputes it once before training (`precompute_ref_log_probs`). This measures the arms against
each other in one run.

SmolLM2-135M-Instruct, LoRA r16 on all linear layers, fp32 (the stage's precision on CPUs without
bf16 units), checkpointing off (the stage's CPU default), TRL's other defaults (its learning rate:
the timing does not depend on it), 4 rows per step, `--pairs` qa-feedback pairs as 2 x pairs
unpaired rows (the first reply desirable, the second not), ~`--tokens` tokens each. Arms, each in
a fresh process, their order rotated per round:

  plain       TRL, the reference inside every step (TRL's default)
  precompute  TRL with precompute_ref_log_probs=True (the strongest TRL setting over several epochs)
  fast        the packed core as the stage runs it (the cache starts empty; the KL replies apart or in
              the reply's row, chosen for the set: `kl_in_row=None`)
  fast_apart  the packed core, the KL replies as a second packed batch without gradient (`kl_in_row=False`)
  fast_in_row the packed core, the KL reply in the reply's own row (`kl_in_row=True`)

Reported per arm and round: wall and process-CPU seconds of training (every step of `--epochs`
epochs), of the reference computed before training (TRL's precompute, the core's cache), and their
sum, and the first losses (the same to float rounding: the same arithmetic). The first forward
passes of a process (kernel set-up for each new shape) fall in the precompute for some arms and in
the first steps for the others: compare whole runs.

    python bench/kto_step.py [--pairs 12] [--epochs 2] [--rounds 2] [--tokens 256] [--prompt-tokens 0]
        [--arms plain,precompute,fast] (also: fast_apart, fast_in_row) [--model smollm2-135m] [--json bench/results/kto_step.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import QA, ROOT, save_results
from dpo_step import make_pairs

ARMS = ("plain", "precompute", "fast", "fast_apart", "fast_in_row")
KL_IN_ROW = {"fast": None, "fast_apart": False, "fast_in_row": True}


def long_prompt_pairs(tokenizer, n_pairs: int, tokens: int, prompt_tokens: int) -> list[dict]:
    """qa-feedback pairs whose prompt is the question and its passages (~`prompt_tokens` tokens, as a
    retrieval-augmented prompt is) and whose replies are the two predictions (~`tokens` - `prompt_tokens`)."""
    pairs = []
    for row in json.loads(QA.read_text()):
        context = row["question"] + "\n\n" + "\n".join(p[1] for p in row["passages"])
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        budget = tokens - prompt_tokens
        replies = [tokenizer(row[f"prediction {i}"], add_special_tokens=False)["input_ids"][:budget] for i in (1, 2)]
        if len(ids) < prompt_tokens - 16 or min(len(r) for r in replies) < budget // 2:
            continue
        prompt = [{"role": "user", "content": tokenizer.decode(ids[: prompt_tokens - 16])}]  # ~16: the chat template
        pairs.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": tokenizer.decode(replies[0])}],
                "rejected": [{"role": "assistant", "content": tokenizer.decode(replies[1])}],
            }
        )
        if len(pairs) == n_pairs:
            return pairs
    raise RuntimeError("not enough long rows in qa-feedback")


def run_arm(arm: str, model_name: str, n_pairs: int, tokens: int, epochs: int, prompt_tokens: int = 0) -> dict:
    """One arm in this process: KTO for `epochs` epochs; seconds and the first losses."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    sys.path.insert(0, str(ROOT))
    from pipeline.models import resolve_model

    torch.manual_seed(0)
    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []
    pairs = (
        long_prompt_pairs(tokenizer, n_pairs, tokens, prompt_tokens) if prompt_tokens else make_pairs(tokenizer, n_pairs, tokens)
    )
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    from trainers.fastpref.kto_trainer import FastKTOTrainer

    precomputed: list[tuple[float, float]] = []

    def timed(work):
        start, cpu = time.perf_counter(), time.process_time()
        out = work()
        precomputed.append((time.perf_counter() - start, time.process_time() - cpu))
        return out

    class TimedKTOTrainer(KTOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            return timed(lambda: super(TimedKTOTrainer, self)._precompute_ref_logps(*a, **k))

    class TimedFastKTOTrainer(FastKTOTrainer):
        def _compute_ref_logps(self, *a, **k):
            return timed(lambda: super(TimedFastKTOTrainer, self)._compute_ref_logps(*a, **k))

    with tempfile.TemporaryDirectory() as out:
        args = KTOConfig(
            output_dir=out,
            per_device_train_batch_size=4,
            num_train_epochs=epochs,
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            precompute_ref_log_probs=arm == "precompute",
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            max_length=2 * tokens,
        )
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        common = {"model": model, "args": args, "train_dataset": Dataset.from_list(rows), "processing_class": tokenizer}
        if arm.startswith("fast"):
            cache = Path(out) / "ref_cache"  # empty: the arm pays for its reference
            trainer = TimedFastKTOTrainer(**common, peft_config=lora, ref_cache_dir=cache, kl_in_row=KL_IN_ROW[arm])
            assert trainer.fast, trainer.fast_off_reason
        else:
            trainer = TimedKTOTrainer(**common, peft_config=lora)
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    losses = [round(h["loss"], 6) for h in trainer.state.log_history if "loss" in h][:4]
    pre, pre_cpu = sum(w for w, _ in precomputed), sum(c for _, c in precomputed)
    return {
        "arm": arm,
        "kl_in_row": getattr(trainer, "kl_in_row", None),  # the core's choice (None: TRL's arms)
        "steps": trainer.state.global_step,
        "train_s": round(train_s, 1),
        "precompute_s": round(pre, 1),
        "total_s": round(train_s + pre, 1),
        "total_cpu_s": round(train_cpu + pre_cpu, 1),
        "first_losses": losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="prompts of ~N tokens (question + passages) before replies of ~tokens-N (default: the question alone)",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arms", default="plain,precompute,fast", help="comma-separated, of: " + ", ".join(ARMS))
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "kto_step.json")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in a child process
    a = ap.parse_args()
    if a.arm:
        print(json.dumps(run_arm(a.arm, a.model, a.pairs, a.tokens, a.epochs, a.prompt_tokens)))
        return
    chosen = [arm for arm in a.arms.split(",") if arm]
    if unknown := sorted(set(chosen) - set(ARMS)):
        sys.exit(f"--arms: unknown {', '.join(unknown)} (choose from {', '.join(ARMS)})")
    rounds: list[dict] = []
    for r in range(a.rounds):
        order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]
        arms = {}
        for arm in order:
            argv = [sys.executable, __file__, "--arm", arm, "--model", a.model, "--pairs", str(a.pairs)]
            argv += ["--tokens", str(a.tokens), "--epochs", str(a.epochs), "--prompt-tokens", str(a.prompt_tokens)]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"arm {arm} failed:\n{proc.stderr[-4000:]}")
            arms[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}", arm, arms[arm], flush=True)
        for arm in chosen:
            for base in ("plain", "precompute"):
                if arm != base and base in chosen and arm not in ("plain",):
                    wall = arms[arm]["total_s"] / arms[base]["total_s"]
                    arms[f"{arm}_over_{base}"] = round(wall, 3)
                    arms[f"{arm}_over_{base}_cpu"] = round(arms[arm]["total_cpu_s"] / arms[base]["total_cpu_s"], 3)
                    print(f"round {r + 1}: {arm} / {base}, whole run: {wall:.2f}x wall", flush=True)
        rounds.append(arms)
    save_results({"config": vars(a) | {"json": str(a.json)}, "rounds": rounds}, a.json)


if __name__ == "__main__":
    main()
