"""Seconds per C3PO step: completion positions only through the LM head vs. the full forward.

SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, 4 examples per step (each four rows:
chosen, rejected, near-scope, out-of-scope), max_length 192 as the arena's budget, fp32 on
CPU, the arena's C3PO settings (KL regulariser). Arms, alternated in one process (same
weights, same batches), warm-up step dropped:

  full      the trainer's scoring before `sequences.score_completions`: the model's forward,
            logits and log-softmax at every position of the padded batch (prompt, padding),
            the reference's forward every step, torch's LoRA dropout
  cold      heedful's: the body's hidden states, only completion positions through the head
            (chunked log-probs; the KL in tiles from hidden states), the reference computed
            (its per-example cache emptied before each step: an example's first visit)
  warm      the same with the reference's numbers from the cache (every later visit)
  warm_torch_dropout  warm with torch's LoRA dropout instead of heedful's CPU mask
            (trainers/lora_dropout.py), which the other arms use as the stage does
  packed_cold, packed_warm  cold and warm on the packed batch the stage trains on
            (`c3po.pack_examples`: each in-scope prompt once for both replies, no padding)

The run's figures are `amortized` and `packed_amortized`: cold for each example's first visit, warm after, over
--run-steps steps of --examples-per-step on a dataset of --dataset examples (the arena's
budget: 30 steps of 4 on ~40 C3PO examples). Prints seconds and CPU seconds per step, the
ratios, and achieved FLOP/s of the useful work against a measured fp32 matmul peak.

    python bench/c3po_step.py [--steps 4] [--rounds 3] [--regularizer kl|nll] [--model tiny]
        [--json bench/results/c3po_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import QA, ROOT, matmul_peak_flops, save_results

ARMS = ("full", "cold", "warm", "warm_torch_dropout", "packed_cold", "packed_warm")


def c3po_rows(n: int, reply_words: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Scoped rows with real text: shipped C3PO prompts, replies cut from qa-feedback answers."""
    from pipeline.paths import resolve_data_ref

    prompts = [json.loads(line) for line in open(resolve_data_ref("data:c3po/cooking_prompts.jsonl"))]
    texts = []
    for row in json.loads(QA.read_text()):
        words = (row["prediction 1"] + " " + " ".join(p[1] for p in row["passages"])).split()
        if len(words) >= reply_words:
            texts.append(" ".join(words[:reply_words]))
    by_scope: dict[str, list[dict]] = {"in_scope": [], "near_scope": [], "out_of_scope": []}
    for i, row in enumerate(prompts):
        scope = by_scope[row["scope"]]
        if len(scope) < n:
            reply = texts[i % len(texts)]
            scope.append({"prompt": row["prompt"], "baseline": reply, "revised": "Chef's tip: " + reply})
    return by_scope["in_scope"], by_scope["near_scope"], by_scope["out_of_scope"]


def step_flops(config, batch, regularizer: str) -> tuple[float, float]:
    """Useful FLOPs of one step, (policy, reference): the policy's body fwd+bwd on every token and
    the head on completion positions (fwd+bwd); the reference's body and head forward on its rows
    (chosen and rejected; near and out too with the KL). With LoRA the base weights are frozen, so
    a linear layer's backward is the input gradient only: 2x its forward's FLOPs in all (LoRA's
    own rank-16 products are ~1.5% and left out); attention's backward is 2x its forward (3x in all)."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    body = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    head = 2 * d * config.vocab_size
    tokens = batch["attention_mask"].sum(-1).tolist()
    scored = batch["completion_mask"][:, 1:].sum(-1).tolist()
    n = len(tokens) // 4
    ref_rows = range(len(tokens)) if regularizer == "kl" else range(2 * n)
    policy = sum(2 * t * body + 3 * 2 * layers * 2 * t * t * d for t in tokens) + 2 * head * sum(scored)
    reference = sum(tokens[i] * body + 2 * layers * 2 * tokens[i] ** 2 * d + head * scored[i] for i in ref_rows)
    return float(policy), float(reference)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm per round (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=4, help="examples per step")
    parser.add_argument("--dataset", type=int, default=40, help="examples in the run (for the amortized figure)")
    parser.add_argument("--run-steps", type=int, default=30, help="steps in the run (for the amortized figure)")
    parser.add_argument("--reply-words", type=int, default=110)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--regularizer", choices=("kl", "nll"), default="kl")
    parser.add_argument("--model", default="smollm2-135m", help="model alias or folder (tiny: a quick check that it runs)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "c3po_step.json")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from pipeline.models import device_policy, load_causal_lm, load_tokenizer
    from trainers.c3po import C3POCollator, C3POTrainer, build_examples, pack_examples
    from trainers.c3po_config import C3POConfig

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(args.model, padding_side="right")
    model = get_peft_model(
        load_causal_lm(args.model), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    )
    examples = build_examples(tokenizer, *c3po_rows(args.examples, args.reply_words), max_length=args.max_length)
    collator = C3POCollator(tokenizer.pad_token_id, packed=False)
    batch = collator(examples[: args.examples])
    packed = pack_examples(examples[: args.examples], tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = C3POTrainer(
            model=model,
            args=TrainingArguments(output_dir=tmp, report_to="none", learning_rate=1e-3, **device_policy().trainer_kwargs()),
            train_dataset=examples,
            data_collator=collator,
            method=C3POConfig(regularizer=args.regularizer, reduction="sequence", learning_rate=1e-3),
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        trainer.current_gradient_accumulation_steps = 1  # set by train(); the bench steps by hand
        model.train()

        def step(arm: str) -> tuple[float, float]:
            set_lora_dropout(model, cpu_mask=arm not in ("full", "warm_torch_dropout"))
            if arm.endswith("cold"):
                trainer._ref_cache.clear()
                trainer._ref_cache_used = 0
            wall, cpu = time.perf_counter(), time.process_time()
            trainer.training_step(model, dict(packed if arm.startswith("packed") else batch))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            return time.perf_counter() - wall, time.process_time() - cpu

        per_arm: dict[str, list[float]] = {arm: [] for arm in ARMS}
        per_arm_cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for r in range(args.rounds):
            for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:  # order rotated per round
                trainer.full_forward = arm == "full"
                step(arm)  # warm-up (and, for warm, fills the cache)
                for _ in range(args.steps):
                    wall, cpu = step(arm)
                    per_arm[arm].append(wall)
                    per_arm_cpu[arm].append(cpu)
                print(f"round {r + 1}: {arm}: {statistics.median(per_arm[arm][-args.steps :]):.3f} s/step", flush=True)

    peak = matmul_peak_flops()
    policy_flops, reference_flops = step_flops(unwrap_config(model), batch, args.regularizer)
    packed_policy, packed_reference = packed_step_flops(unwrap_config(model), packed, args.regularizer)
    flops = {
        "full": policy_flops + reference_flops,
        "cold": policy_flops + reference_flops,
        "warm": policy_flops,
        "warm_torch_dropout": policy_flops,
        "packed_cold": packed_policy + packed_reference,
        "packed_warm": packed_policy,
    }
    median = {arm: statistics.median(v) for arm, v in per_arm.items()}
    median_cpu = {arm: statistics.median(v) for arm, v in per_arm_cpu.items()}
    first_visits = min(1.0, args.dataset / (args.run_steps * args.examples))  # share of steps whose examples are new
    for table in (median, median_cpu):
        table["amortized"] = first_visits * table["cold"] + (1 - first_visits) * table["warm"]
        table["packed_amortized"] = first_visits * table["packed_cold"] + (1 - first_visits) * table["packed_warm"]
    result = {
        "model": f"{args.model} (fp32, CPU), LoRA r16",
        "threads": torch.get_num_threads(),
        "examples_per_step": args.examples,
        "rows_per_step": int(batch["input_ids"].shape[0]),
        "padded_length": int(batch["input_ids"].shape[1]),
        "completion_tokens": int(batch["completion_mask"].sum()),
        "tokens": int(batch["attention_mask"].sum()),
        "packed_rows_x_length": list(packed["input_ids"].shape),
        "packed_tokens": sum(
            start_p_c_k[1] + start_p_c_k[2] + start_p_c_k[3] for row in packed["segments"] for start_p_c_k in row
        ),
        "regularizer": args.regularizer,
        **{f"{arm}_seconds_per_step": round(v, 3) for arm, v in median.items()},
        **{f"{arm}_cpu_seconds_per_step": round(v, 3) for arm, v in median_cpu.items()},
        "run": f"{args.run_steps} steps x {args.examples} examples on {args.dataset}: {first_visits:.0%} first visits",
        **{f"{arm}_time_vs_full": round(median[arm] / median["full"], 3) for arm in ("cold", "warm", "amortized")},
        **{
            f"packed_{arm}_time_vs_{arm}": round(median[f"packed_{arm}"] / median[arm], 3)
            for arm in ("cold", "warm", "amortized")
        },
        "warm_time_vs_warm_torch_dropout": round(median["warm"] / median["warm_torch_dropout"], 3),
        **{f"cpu_{arm}_time_vs_full": round(median_cpu[arm] / median_cpu["full"], 3) for arm in ("cold", "warm", "amortized")},
        "steps": per_arm,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "step_gflop": {arm: round(f / 1e9, 2) for arm, f in flops.items()},
        **{f"{arm}_gflops": round(flops[arm] / median[arm] / 1e9, 2) for arm in ARMS},
        "load_average": round(os.getloadavg()[0], 1),
    }
    save_results(result, args.json)


def set_lora_dropout(model, cpu_mask: bool) -> None:
    """heedful's CPU-mask LoRA dropout (as the training stages install it) or torch's nn.Dropout."""
    import torch

    from trainers.lora_dropout import use_cpu_lora_dropout

    if cpu_mask:
        use_cpu_lora_dropout(model)
        return
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        for name, dropout in (dropouts or {}).items():
            if isinstance(dropout, torch.nn.Dropout):
                dropouts[name] = torch.nn.Dropout(dropout.p).train(dropout.training)


def packed_step_flops(config, packed, regularizer: str) -> tuple[float, float]:
    """`step_flops` of the packed batch: the body on each unit's tokens once (the in-scope prompt
    once for both replies), attention per unit's two causal pieces, the head on the scored positions."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    body = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    head = 2 * d * config.vocab_size
    units = [(p, c, k) for row in packed["segments"] for _, p, c, k in row]
    policy = sum(2 * (p + c + k) * body + 3 * 2 * layers * 2 * ((p + c) ** 2 + k * (p + k)) * d for p, c, k in units)
    policy += 2 * head * len(packed["score_seq"])
    kl_units = units if regularizer == "kl" else [u for u in units if u[2]]  # in-scope units hold the DPO pair
    reference = sum((p + c + k) * body + 2 * layers * 2 * ((p + c) ** 2 + k * (p + k)) * d for p, c, k in kl_units)
    reference += head * len(packed["score_seq"])
    return float(policy), float(reference)


def unwrap_config(model):
    from trainers.fastpref.logps import unwrap_peft

    return unwrap_peft(model).config


if __name__ == "__main__":
    main()
