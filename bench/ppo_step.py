"""Seconds per PPO step and rollout tokens/s for heedful's `ppo` trainer.

SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, 4 prompts x 4 samples of up to 64
new tokens (top-k 20, T 0.7), 4 PPO epochs in minibatches of 4, a dense rule reward
(prompt_overlap), fp32 on CPU. Reports the step's parts (sampling; old/reference
log-probs + values + rewards; the PPO epochs) and two yardsticks run in the same script:

- rollout: tokens/s of heedful's rollout (LoRA policy, batched HF generate) against plain
  `model.generate` of the bare base model on the same prompts and settings: what sampling
  through an unmerged LoRA costs. (No library PPO runs here to compare whole steps with:
  TRL >= 1.13 has none and OpenRLHF needs DeepSpeed on GPUs.)
- update: achieved FLOP/s of the whole step against a measured fp32 matmul peak.

    python bench/ppo_step.py [--steps 3] [--device cuda] [--engine vllm] [--json PATH]

On a GPU, `--device cuda` runs the same measurement (bf16, batched HF generation) and
`--engine vllm` samples with vLLM (when installed); neither has been run on the CPU-only
machines this project is built on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import ROOT, matmul_peak_flops, save_results


def forward_flops(config, tokens: int, context: int) -> float:
    """One forward over `tokens` positions attending to ~`context` positions each."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_token = 2 * (layers * (2 * d * d + 2 * d * kv + 3 * d * ff))
    return tokens * (per_token + layers * 4 * context * d)


def step_flops(config, query_lens: list[int], response_lens: list[int], epochs: int) -> float:
    """Useful FLOPs of a PPO step: generation (one position per new token, LM head included),
    then per sample: policy + reference forwards (annotate) and `epochs` x (forward + input-grad
    backward ~ 2 forwards) over prompt + response; LM head only on response positions."""
    head = 2 * config.hidden_size * config.vocab_size
    total = 0.0
    for q, r in zip(query_lens, response_lens):
        seq = q + r
        gen = forward_flops(config, r, q + r // 2) + r * head
        full = forward_flops(config, seq, seq // 2) + r * head
        total += gen + 2 * full + epochs * 2 * full
    return total


def plain_generate_tokens_per_s(model_path: str, device: str, conversations, settings, reps: int = 2) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models import device_policy, load_tokenizer
    from trainers.ppo.rollout import encode_prompts, eos_token_ids, hf_sample

    policy = device_policy(device)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=policy.dtype).to(policy.device).eval()
    tokenizer = load_tokenizer(model_path)
    ids, mask, _ = encode_prompts(tokenizer, conversations, settings.max_prompt_length, policy.device)
    eos = eos_token_ids(model, tokenizer)
    rates = []
    for rep in range(reps):
        torch.manual_seed(rep)
        t = time.perf_counter()
        out = hf_sample(
            model,
            tokenizer,
            ids,
            mask,
            settings.samples_per_prompt,
            settings.max_new_tokens,
            settings.temperature,
            settings.top_k,
            settings.top_p,
            eos,
        )
        seconds = time.perf_counter() - t
        from trainers.ppo.rollout import cut_at_eos

        _, _, lengths, _ = cut_at_eos(out, eos, tokenizer.pad_token_id)
        rates.append(int(lengths.sum()) / seconds)
    del model
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "ppo_step.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from pipeline.models import load_tokenizer, prepare_smollm2
    from pipeline.records import load_rows
    from reward_models.rules import PromptOverlapReward
    from trainers.ppo.config import PpoSettings
    from trainers.ppo.models import build_models
    from trainers.ppo.objectives import Objective
    from trainers.ppo.trainer import PpoTrainer, Prompt

    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    path = str(prepare_smollm2())
    rows = load_rows(ROOT / "data" / "quickstart" / "prompts.jsonl")
    prompts = [Prompt(r["id"], [{"role": "user", "content": r["prompt"]}], r["prompt"]) for r in rows]
    settings = PpoSettings(
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        samples_per_prompt=4,
        max_new_tokens=args.max_new_tokens,
        mini_batch_size=4,
        device=args.device,
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        rollout_engine=args.engine,
        save_steps=10_000,
    )
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    models = build_models(path, settings.lora, settings.value_model, settings.device_policy())
    trainer = PpoTrainer(settings, models, tokenizer, [Objective("overlap", PromptOverlapReward())], prompts, seed=0)

    query_lens, response_lens = [], []
    original_sample = trainer.sample

    def recording_sample(prompts_, num_samples, temperature):
        rollout = original_sample(prompts_, num_samples, temperature)
        query_lens.extend(rollout.query_mask.sum(1).tolist())
        response_lens.extend(rollout.lengths.tolist())
        return rollout

    trainer.sample = recording_sample
    state = trainer.train()
    rows_ = state.curves[1:]  # drop the warm-up step (allocator, first-call overheads)
    step_s = statistics.median(r["time/step_s"] for r in rows_)
    model_config = AutoConfig.from_pretrained(path)
    per_step = len(query_lens) // args.steps
    flops = statistics.median(
        step_flops(
            model_config,
            query_lens[i * per_step : (i + 1) * per_step],
            response_lens[i * per_step : (i + 1) * per_step],
            settings.ppo_epochs,
        )
        for i in range(1, args.steps)
    )
    heedful_tps = statistics.median(r["rollout/tokens_per_s"] for r in rows_)
    del trainer, models
    conversations = [p.conversation for p in prompts[: args.prompts_per_step]]
    plain_tps = plain_generate_tokens_per_s(path, args.device, conversations, settings)
    peak = matmul_peak_flops(args.device)
    result = {
        "model": f"SmolLM2-135M-Instruct ({settings.device_policy().dtype_name}, {args.device})",
        "threads": torch.get_num_threads(),
        "rollout": f"{args.prompts_per_step} prompts x 4 samples, <= {args.max_new_tokens} new tokens, engine {args.engine}",
        "steps_measured": len(rows_),
        "seconds_per_step": round(step_s, 3),
        "seconds_sampling": round(statistics.median(r["time/rollout_s"] for r in rows_), 3),
        "seconds_logprobs_values_rewards": round(statistics.median(r["time/score_s"] for r in rows_), 3),
        "seconds_ppo_epochs": round(statistics.median(r["time/update_s"] for r in rows_), 3),
        "mean_response_tokens": round(statistics.mean(r["response/length"] for r in rows_), 1),
        "rollout_tokens_per_s": round(heedful_tps, 1),
        "plain_generate_tokens_per_s": round(plain_tps, 1),
        "rollout_vs_plain_generate": round(heedful_tps / plain_tps, 3),
        "step_gflop": round(flops / 1e9, 1),
        "step_gflops_achieved": round(flops / step_s / 1e9, 1),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "fraction_of_peak": round(flops / step_s / peak, 3),
    }
    save_results(result, args.json)


if __name__ == "__main__":
    main()
