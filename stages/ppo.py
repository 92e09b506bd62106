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

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output, Stage, StageConfig
from trainers.ppo.config import NON_SEMANTIC_PPO_FIELDS, PpoSettings

RM_INPUTS = ("reward_model", "reward_model_2", "reward_model_3")


class ObjectiveSpec(BaseModel):
    """One reward: a wired reward-model input or an inline rule, with its weight."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, description="label in curves and the report (default: input name or rule)")
    input: Literal["reward_model", "reward_model_2", "reward_model_3"] | None = None
    rule: dict[str, Any] | None = Field(default=None, description="e.g. {rule: token_class, pattern: '\\\\d'}")
    weight: float = 1.0

    @model_validator(mode="after")
    def _one_source(self) -> "ObjectiveSpec":
        if (self.input is None) == (self.rule is None):
            raise ValueError("give exactly one of input or rule")
        if self.rule is not None:
            from reward_models.rules import build_rule

            build_rule(self.rule)  # fail at validation, not after loading a model
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.input if self.input else str(self.rule.get("name") or self.rule.get("rule"))


class PpoStageConfig(PpoSettings, StageConfig):
    objectives: list[ObjectiveSpec] = Field(default_factory=list, description="default: every wired reward_model input, weight 1")
    prompt_field: str = "prompt"
    max_prompts: int | None = Field(default=None, ge=1)
    holdout_prompts: int = Field(default=0, ge=0, description="without an eval_prompts input: keep the last N prompts out of training and evaluate on them")
    normalize_rewards: bool = Field(default=False, description="z-score each objective with running statistics "
                                    "(reward_models.combine); off = FineGrainedRLHF's fixed per-objective weights")
    reward_clip: float | None = Field(default=None, gt=0, description="clip each objective's (z-)score to [-c, c]")
    max_share: float | None = Field(default=None, gt=0, le=1, description="cap on one objective's share of the total |reward| (combine.py)")

    @model_validator(mode="after")
    def _unique_names(self) -> "PpoStageConfig":
        labels = [o.label for o in self.objectives]
        if len(set(labels)) != len(labels):
            raise ValueError(f"objective names must be unique, got {labels}")
        return self


def load_prompts(path: Path, field: str, limit: int | None, what: str):
    from trainers.ppo.trainer import Prompt

    rows = load_rows(path, required=[field], what=what)
    if limit:
        rows = rows[:limit]
    prompts = []
    for row in rows:
        value = row[field]
        conversation = [{"role": "user", "content": str(value)}] if isinstance(value, str) else list(value)
        pid = str(row.get("id") or hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12])
        prompts.append(Prompt(pid, conversation, value))
    return prompts


class PpoStage(Stage):
    uses = "ppo"
    summary = "PPO with dense, multi-objective rewards (LoRA policy, KL to the base)."
    Config = PpoStageConfig
    inputs = {
        "prompts": Input(("prompts",), doc="rows with a prompt field (string or chat messages)"),
        "eval_prompts": Input(("prompts",), required=False, doc="held-out prompts scored during training"),
        **{name: Input(("reward_model",), required=False, doc="a reward model folder (reward_model.json)") for name in RM_INPUTS},
        "adapter": Input(("adapter",), required=False, doc="continue this LoRA adapter (the reference stays the base)"),
    }
    outputs = {
        "adapter": Output("adapter", doc="PEFT LoRA adapter of the policy"),
        "samples": Output("responses", required=False,
                          doc="held-out replies at each evaluation with every objective's score (with eval_prompts)"),
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
            if spec.input is not None:
                path = self.ctx.input(spec.input)
                if path is None:
                    raise ValueError(f"objective '{spec.label}' reads input '{spec.input}', which is not wired")
                parts.append(combine.Objective(spec.label, load_reward_model(path), spec.weight, cfg.normalize_rewards, str(path)))
            else:
                parts.append(combine.Objective(spec.label, build_rule(spec.rule), spec.weight, cfg.normalize_rewards))
        combined = combine.CombinedReward(parts, clip=cfg.reward_clip, max_share=cfg.max_share)
        return Objective("reward", combined, 1.0, flatten=True), parts

    def run(self):
        import torch

        from pipeline.models import load_tokenizer
        from trainers.ppo.models import build_models
        from trainers.ppo.trainer import PpoTrainer, summary

        cfg: PpoStageConfig = self.config
        ctx = self.ctx
        prompts = load_prompts(ctx.input("prompts"), cfg.prompt_field, cfg.max_prompts, "prompts")
        eval_input = ctx.input("eval_prompts")
        eval_prompts = load_prompts(eval_input, cfg.prompt_field, cfg.eval_prompts, "eval prompts") if eval_input else None
        if cfg.holdout_prompts and eval_prompts is None:
            if cfg.holdout_prompts >= len(prompts):
                raise ValueError(f"holdout_prompts={cfg.holdout_prompts} leaves no training prompts (there are {len(prompts)})")
            prompts, eval_prompts = prompts[: -cfg.holdout_prompts], prompts[-cfg.holdout_prompts:]
        reward, parts = self.reward()
        torch.manual_seed(ctx.seed)  # a resumed run restores the RNG from its checkpoint instead
        policy = cfg.device_policy()
        tokenizer = load_tokenizer(ctx.model)
        models = build_models(ctx.model, cfg.lora, cfg.value_model, policy, adapter=ctx.input("adapter"))
        ctx.log.info("PPO on %d prompts (%d held out), objectives: %s", len(prompts), len(eval_prompts or []),
                     ", ".join(f"{o.name} x{o.weight:g}" for o in parts))
        trainer = PpoTrainer(cfg, models, tokenizer, [reward], prompts, eval_prompts, ctx.checkpoint_dir,
                             seed=ctx.seed, log=ctx.log)
        state = trainer.train()
        models.policy.save_pretrained(str(ctx.output("adapter")))
        if state.samples:
            save_rows(state.samples, ctx.output("samples"))
        ctx.save_curves(state.curves)
        trainer.cleanup_checkpoints()
        metrics = summary(state)
        metrics["prompts"] = len(prompts)
        if trainer.resumed_from:
            metrics["resumed_from"] = trainer.resumed_from
        return metrics


def _register_report_section() -> None:
    from pipeline.report import SECTIONS
    from trainers.ppo.report import report_section

    if report_section not in SECTIONS:
        SECTIONS.append(report_section)


_register_report_section()
