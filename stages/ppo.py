"""ppo: heedful's own PPO with dense, multi-objective rewards and a LoRA policy.

TRL (>= 1.13) has no PPO and its old one took one scalar per reply; fine-grained RLHF
needs per-token rewards from several reward models. Each objective is a trained reward
model (inputs `reward_model`, `reward_model_2`, `reward_model_3`) or an inline rule
(`reward_models.rules`); `reward_models.combine` weighs them (optionally z-scored with
running statistics) into one per-token reward. The math is in `trainers/ppo/`.

```yaml
- name: rl
  uses: ppo
  inputs: {prompts: data:quickstart/prompts.jsonl, reward_model: rm.model}
  with:
    steps: 20
    objectives:
      - {input: reward_model, weight: 1.0}
      - {name: no_repeats, rule: {rule: prompt_overlap, value: 0.0, repeat_penalty: 0.5}, weight: 1.0}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline.chat import as_messages, row_prompt_id
from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output, Stage, StageConfig
from pipeline.training import log_curves
from reward_models.combine import REWARD_INPUTS as RM_INPUTS
from reward_models.combine import ObjectiveSpec
from trainers.ppo.config import NON_SEMANTIC_PPO_FIELDS, PpoSettings


class PpoStageConfig(PpoSettings, StageConfig):
    objectives: list[ObjectiveSpec] = Field(default_factory=list, description="default: every wired reward_model input, weight 1")
    prompt_field: str = "prompt"
    max_prompts: int | None = Field(default=None, ge=1)
    holdout_prompts: int = Field(
        default=0, ge=0, description="without an eval_prompts input: keep the last N prompts out of training and evaluate on them"
    )
    normalize_rewards: bool = Field(
        default=False,
        description="z-score each objective with running statistics "
        "(reward_models.combine); off = FineGrainedRLHF's fixed per-objective weights",
    )
    reward_clip: float | None = Field(default=None, gt=0, description="clip each objective's (z-)score to [-c, c]")
    max_share: float | None = Field(
        default=None, gt=0, le=1, description="cap on one objective's share of the total |reward| (combine.py)"
    )
    seed: int | None = Field(
        default=None,
        description="initialisation, prompt order and sampling (default: the pipeline's seed; the arena sets one per arm)",
    )
    reference: Literal["adapter", "base"] = Field(
        default="adapter",
        description="with an adapter input: the KL reference is that adapter as it starts (PPO after SFT, as in "
        "InstructGPT; as c3po continues one) or the base with the adapter off",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> PpoStageConfig:
        if any(o.path is not None for o in self.objectives):
            raise ValueError("ppo objectives read a wired reward-model `input` (or a `rule`), not a `path`")
        labels = [o.label for o in self.objectives]
        if len(set(labels)) != len(labels):
            raise ValueError(f"objective names must be unique, got {labels}")
        return self


def training_speed(curves: list[dict], samples_per_rollout: int) -> dict[str, float]:
    """The arena's cost columns for a PPO run: replies sampled and trained on per second of the
    rollouts' own step times (`time/step_s`: so a resumed run counts its earlier rollouts with
    their own time), their tokens per second (each rollout's mean reply length), peak memory."""
    from pipeline.stats import peak_memory_mb

    rollouts = [r for r in curves if "response/length" in r and r.get("time/step_s")]
    out = {"peak_memory_mb": peak_memory_mb()}
    seconds = sum(r["time/step_s"] for r in rollouts)
    if seconds > 0:
        out["train_samples_per_second"] = round(samples_per_rollout * len(rollouts) / seconds, 4)
        out["train_tokens_per_second"] = round(sum(samples_per_rollout * r["response/length"] for r in rollouts) / seconds, 3)
    return out


def load_prompts(path: Path, field: str, limit: int | None, what: str, seed: int = 0):
    """The rows' prompts. c3po_data rows carry their scope (in_scope, near_scope, out_of_scope; any
    other value is no scope), which scoped rules (feedback_metric) read; such rows come grouped by
    scope, so they are shuffled (seeded) before `limit` and any hold-out slice take a share of each."""
    import random

    from trainers.feedback_eval import SCOPES
    from trainers.ppo.trainer import Prompt

    rows = load_rows(path, required=[field], what=what)
    if any(row.get("scope") in SCOPES for row in rows):
        random.Random(seed).shuffle(rows)
    if limit:
        rows = rows[:limit]
    prompts = []
    for row in rows:
        scope = row.get("scope") if row.get("scope") in SCOPES else None
        prompts.append(Prompt(row_prompt_id(row, field), as_messages(row[field]), row[field], scope))
    return prompts


class PpoStage(Stage):
    uses = "ppo"
    summary = "PPO with dense, multi-objective rewards (LoRA policy, KL to the base or the adapter it continues)."
    # 2: a continued adapter is the KL reference (reference: adapter); the base was before
    # 3: c3po_data rows (grouped by scope) shuffled with the seed before any slice
    # 4: a scalar reward model's score is earned at the EOS through the combination too (it sat on
    #    the last text token: stopping earned nothing, one more token the whole score)
    version = "4"
    Config = PpoStageConfig
    inputs = {
        "prompts": Input(
            ("prompts", "preferences", "c3po_data"),
            doc="rows with a prompt field (string or chat messages); preferences: their prompts; c3po_data: every "
            "scope's prompts, each with its scope",
        ),
        "eval_prompts": Input(("prompts",), required=False, doc="held-out prompts scored during training"),
        **{name: Input(("reward_model",), required=False, doc="a reward model folder (reward_model.json)") for name in RM_INPUTS},
        "adapter": Input(("adapter",), required=False, doc="continue this LoRA adapter (the KL reference: `reference`)"),
    }
    outputs = {
        "adapter": Output("adapter", doc="PEFT LoRA adapter of the policy"),
        "samples": Output(
            "responses",
            required=False,
            doc="held-out replies at each evaluation with every objective's score (with eval_prompts)",
        ),
    }
    default_num_cpus = float("inf")
    non_semantic_fields = NON_SEMANTIC_PPO_FIELDS

    def reward(self):
        """All objectives as one reward model through reward_models.combine (weights, optional
        running z-scores, share cap); its components keep each objective's own score for logging."""
        from reward_models import combine
        from reward_models.base import load_reward_model
        from reward_models.rules import build_rule
        from trainers.ppo.objectives import Objective

        cfg: PpoStageConfig = self.config
        specs = cfg.objectives or [ObjectiveSpec(input=name) for name in RM_INPUTS if self.ctx.input(name)]
        if not specs:
            raise ValueError("ppo needs a reward: wire a reward_model input or give objectives: [{rule: {...}}]")
        parts = []
        for spec in specs:
            normalize = cfg.normalize_rewards if spec.normalize is None else spec.normalize
            if spec.input is not None:
                path = self.ctx.input(spec.input)
                if path is None:
                    raise ValueError(f"objective '{spec.label}' reads input '{spec.input}', which is not wired")
                parts.append(combine.Objective(str(spec.label), load_reward_model(path), spec.weight, normalize, str(path)))
            else:
                parts.append(combine.Objective(str(spec.label), build_rule(spec.rule), spec.weight, normalize))
        combined = combine.CombinedReward(parts, clip=cfg.reward_clip, max_share=cfg.max_share)
        return Objective("reward", combined, 1.0, flatten=True), parts

    def run(self):
        import torch

        from pipeline.models import load_tokenizer
        from trainers.ppo.models import build_models
        from trainers.ppo.trainer import PpoTrainer, summary

        cfg: PpoStageConfig = self.config
        ctx = self.ctx
        trackers = cfg.trackers()  # a tracker that is not installed fails before training
        seed = ctx.seed if cfg.seed is None else cfg.seed
        prompts = load_prompts(ctx.input("prompts"), cfg.prompt_field, cfg.max_prompts, "prompts", seed)
        eval_input = ctx.input("eval_prompts")
        eval_prompts = load_prompts(eval_input, cfg.prompt_field, cfg.eval_prompts, "eval prompts", seed) if eval_input else None
        if cfg.holdout_prompts and eval_prompts is None:
            if cfg.holdout_prompts >= len(prompts):
                raise ValueError(f"holdout_prompts={cfg.holdout_prompts} leaves no training prompts (there are {len(prompts)})")
            prompts, eval_prompts = prompts[: -cfg.holdout_prompts], prompts[-cfg.holdout_prompts :]
        reward, parts = self.reward()
        torch.manual_seed(seed)  # a resumed run restores the RNG from its checkpoint instead
        policy = cfg.device_policy()
        tokenizer = load_tokenizer(ctx.model)
        models = build_models(ctx.model, cfg.lora, cfg.value_model, policy, adapter=ctx.input("adapter"), reference=cfg.reference)
        ctx.log.info(
            "PPO on %d prompts (%d held out), KL to the %s, objectives: %s",
            len(prompts),
            len(eval_prompts or []),
            "continued adapter" if models.reference_weights is not None else "base",
            ", ".join(f"{o.name} x{o.weight:g}" for o in parts),
        )
        trainer = PpoTrainer(cfg, models, tokenizer, [reward], prompts, eval_prompts, ctx.checkpoint_dir, seed=seed, log=ctx.log)
        state = trainer.train()
        models.policy.save_pretrained(str(ctx.output("adapter")))
        if state.samples:
            save_rows(state.samples, ctx.output("samples"))
        ctx.save_curves(state.curves)
        log_curves(ctx, trackers, state.curves)
        trainer.cleanup_checkpoints()
        metrics = summary(state)
        metrics["prompts"] = len(prompts)
        metrics.update(training_speed(state.curves, cfg.samples_per_prompt * cfg.prompts_per_step))
        if trainer.resumed_from:
            metrics["resumed_from"] = trainer.resumed_from
        return metrics

    @classmethod
    def report_section(cls, run_root, manifests):
        from trainers.ppo.report import report_section

        return report_section(run_root, manifests)
