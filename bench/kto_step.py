"""Does TRL's `precompute_ref_log_probs` make heedful's `kto` stage faster? KTO with and without it, one run.

heedful's `kto` stage is TRL's KTOTrainer (the preference core in trainers/fastpref serves dpo and
c3po). Its reference log-probs (each reply's and each mismatched KL reply's, with the adapter off)
are computed inside every step unless TRL precomputes them once before training. Over several
epochs that should save a reference forward per row and epoch. This measures whether it does.

SmolLM2-135M-Instruct, LoRA r16 on all linear layers, fp32 (the stage's precision on CPUs without
bf16 units), checkpointing off (the stage's CPU default), TRL's other defaults (its learning rate:
the timing does not depend on it), 4 rows per step, `--pairs` qa-feedback pairs as 2 x pairs
unpaired rows (the first reply desirable, the second not), ~`--tokens` tokens each. Arms, each in
a fresh process, their order rotated per round:

  plain       the reference inside every step (TRL's default; the stage's before it chose per run)
  precompute  the same with precompute_ref_log_probs=True

Reported per arm and round: wall and process-CPU seconds of training (every step of `--epochs`
epochs), of the precompute, and their sum, and the first losses (the same to float rounding: the
same arithmetic). The first forward passes of a process (kernel set-up for each new shape) fall
in the precompute for that arm and in the first steps for the other: compare whole runs.

    python bench/kto_step.py [--pairs 12] [--epochs 2] [--rounds 2] [--tokens 256]
        [--model smollm2-135m] [--json bench/results/kto_step.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save_results
from dpo_step import make_pairs


def run_arm(precompute: bool, model_name: str, n_pairs: int, tokens: int, epochs: int) -> dict:
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
    for pair in make_pairs(tokenizer, n_pairs, tokens):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    precomputed: list[tuple[float, float]] = []

    class TimedKTOTrainer(KTOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            start, cpu = time.perf_counter(), time.process_time()
            out = super()._precompute_ref_logps(*a, **k)
            precomputed.append((time.perf_counter() - start, time.process_time() - cpu))
            return out

    with tempfile.TemporaryDirectory() as out:
        args = KTOConfig(
            output_dir=out,
            per_device_train_batch_size=4,
            num_train_epochs=epochs,
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            precompute_ref_log_probs=precompute,
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            max_length=2 * tokens,
        )
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = TimedKTOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
        )
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    losses = [round(h["loss"], 6) for h in trainer.state.log_history if "loss" in h][:4]
    pre, pre_cpu = sum(w for w, _ in precomputed), sum(c for _, c in precomputed)
    return {
        "precompute": precompute,
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
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "kto_step.json")
    ap.add_argument("--arm", choices=["plain", "precompute"], help=argparse.SUPPRESS)  # one arm, in a child process
    a = ap.parse_args()
    if a.arm:
        print(json.dumps(run_arm(a.arm == "precompute", a.model, a.pairs, a.tokens, a.epochs)))
        return
    rounds: list[dict] = []
    for r in range(a.rounds):
        order = ["plain", "precompute"] if r % 2 == 0 else ["precompute", "plain"]
        arms = {}
        for arm in order:
            argv = [sys.executable, __file__, "--arm", arm, "--model", a.model, "--pairs", str(a.pairs)]
            argv += ["--tokens", str(a.tokens), "--epochs", str(a.epochs)]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"arm {arm} failed:\n{proc.stderr[-4000:]}")
            arms[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}", arm, arms[arm], flush=True)
        arms["precompute_over_plain"] = round(arms["precompute"]["total_s"] / arms["plain"]["total_s"], 3)
        arms["precompute_over_plain_cpu"] = round(arms["precompute"]["total_cpu_s"] / arms["plain"]["total_cpu_s"], 3)
        print(f"round {r + 1}: precompute / plain, whole run: {arms['precompute_over_plain']:.2f}x wall", flush=True)
        rounds.append(arms)
    save_results({"config": vars(a) | {"json": str(a.json)}, "rounds": rounds}, a.json)


if __name__ == "__main__":
    main()
