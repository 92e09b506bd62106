"""The PPO loop: rollout -> rewards -> KL shaping -> GAE -> epochs of clipped updates.

No Ray and no stage here: the `ppo` stage (stages/ppo.py) builds a PpoTrainer and calls
`train()`; tests and benchmarks drive it directly.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from pipeline.chat import as_messages
from reward_models.base import RewardBatch
from trainers.sequences import masked_mean

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import PpoSettings
from .gae import gae_advantages
from .losses import clipped_policy_loss, clipped_value_loss, explained_variance
from .masked import masked_whiten
from .models import PpoModels
from .objectives import Objective, score_objectives
from .rollout import Rollout, build_rollout, encode_prompts, eos_token_ids, hf_sample
from .shaping import kl_per_token, place_scalar, shape_rewards


@dataclass
class Prompt:
    id: str
    conversation: list[dict[str, str]]  # what the policy sees (chat template applied later)
    reward_prompt: Any  # what reward models see (the row's prompt as given)
    scope: str | None = None  # a c3po_data row's scope (in_scope, near_scope, ...): scoped rules read it


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0  # pass over the prompts
    position: int = 0  # next prompt within this pass's order
    kl_over_threshold: int = 0
    stopped: str = ""
    curves: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


class PpoTrainer:
    def __init__(
        self,
        settings: PpoSettings,
        models: PpoModels,
        tokenizer,
        objectives: list[Objective],
        prompts: list[Prompt],
        eval_prompts: list[Prompt] | None = None,
        checkpoint_dir: Path | None = None,
        seed: int = 0,
        log: logging.Logger | None = None,
        on_step: Callable[[int, dict[str, Any]], None] | None = None,
    ):
        if not prompts:
            raise ValueError("PPO needs at least one training prompt")
        if not objectives:
            raise ValueError("PPO needs at least one reward model")
        self.s, self.models, self.tokenizer = settings, models, tokenizer
        self.objectives, self.prompts = objectives, prompts
        self.eval_prompts = (eval_prompts or [])[: settings.eval_prompts]
        self.checkpoint_dir, self.seed = checkpoint_dir, seed
        self.log = log or logging.getLogger("heedful.ppo")
        self.on_step = on_step
        self.device = models.device
        self.eos_ids = eos_token_ids(models.policy, tokenizer)
        self.state = LoopState()
        value_lr = settings.value_learning_rate or settings.learning_rate
        # walking the base model's parameters for the trainable few is not free: once, here
        policy_params, value_params = models.policy_parameters(), models.value_parameters()
        self.trainable = policy_params + value_params
        self.optimizer = torch.optim.AdamW(
            [{"params": policy_params, "lr": settings.learning_rate}, {"params": value_params, "lr": value_lr}],
            weight_decay=settings.weight_decay,
        )
        warmup = settings.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warmup) if warmup else 1.0
        )
        self.sampler = None
        if settings.rollout_engine != "hf":
            from pipeline.generation import pick_engine

            if pick_engine(settings.rollout_engine, str(self.device)) == "vllm":
                from .vllm_rollout import VllmSampler, lora_rank_of

                base_path = models.policy.get_base_model().config._name_or_path
                self.sampler = VllmSampler(base_path, lora_rank_of(models.policy), seed=seed)
        self.resumed_from: str | None = None

    # ------------------------------------------------------------------ prompts

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_prompts(self) -> list[Prompt]:
        """The step's prompts: passes over the data in a seeded order, wrapping across passes."""
        picked: list[Prompt] = []
        order = self._order(self.state.epoch)
        while len(picked) < self.s.prompts_per_step:
            picked.append(self.prompts[order[self.state.position]])
            self.state.position += 1
            if self.state.position == len(order):
                self.state.epoch, self.state.position = self.state.epoch + 1, 0
                order = self._order(self.state.epoch)
        return picked

    def conversation(self, prompt: Prompt) -> list[dict[str, str]]:
        return as_messages(prompt.conversation, self.s.system_prompt)

    # ------------------------------------------------------------------ rollout

    def _micro_slices(self, n: int) -> list[slice]:
        size = self.s.micro_batch_size or self.s.mini_batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def sample(self, prompts: list[Prompt], num_samples: int, temperature: float) -> Rollout:
        s = self.s
        query_ids, query_mask, cut = encode_prompts(
            self.tokenizer, [self.conversation(p) for p in prompts], s.max_prompt_length, self.device
        )
        if cut:
            self.log.warning("%d prompt(s) longer than max_prompt_length=%d kept their last tokens", cut, s.max_prompt_length)
        if self.sampler is not None and temperature > 0:
            self.sampler.sync(self.models.policy)
            generated = self.sampler.sample(
                query_ids,
                query_mask,
                num_samples,
                s.max_new_tokens,
                temperature,
                s.top_k,
                s.top_p,
                self.eos_ids,
                self.tokenizer.pad_token_id,
                seed=int(torch.randint(0, 2**31 - 1, (1,))),
            )
        else:
            generated = hf_sample(
                self.models.policy,
                self.tokenizer,
                query_ids,
                query_mask,
                num_samples,
                s.max_new_tokens,
                temperature,
                s.top_k,
                s.top_p,
                self.eos_ids,
                s.rollout_batch_size,
            )
        return build_rollout(
            self.tokenizer,
            query_ids,
            query_mask,
            generated,
            num_samples,
            self.eos_ids,
            [p.reward_prompt for p in prompts],
            [p.scope for p in prompts],
        )

    @torch.no_grad()
    def annotate(self, rollout: Rollout, temperature: float) -> None:
        """Old log-probs, entropy and values under the current policy; reference log-probs (models.reference)."""
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "values": [], "ref_logprobs": []}
        R = rollout.response_ids.shape[1]
        for sl in self._micro_slices(len(rollout)):
            args = (rollout.query_ids[sl], rollout.query_mask[sl], rollout.response_ids[sl], rollout.response_mask[sl])
            out, values = self.models.evaluate(*args, temperature=temperature, want_entropy=True)
            parts["logprobs"].append(out.logprobs)
            assert out.entropy is not None  # want_entropy=True
            parts["entropy"].append(out.entropy)
            parts["values"].append(values.float())
            parts["ref_logprobs"].append(self.models.reference_logprobs(*args, temperature=temperature))
        mask = rollout.response_mask.float()
        for name, chunks in parts.items():
            tensor = torch.cat(chunks)
            assert tensor.shape[1] == R
            setattr(rollout, name, tensor.float() * mask)

    def score(self, rollout: Rollout) -> dict[str, Any]:
        batch = RewardBatch(
            prompts=rollout.prompts,
            responses=rollout.texts,
            response_token_ids=rollout.response_token_ids(),
            policy_tokenizer=self.tokenizer,
            scopes=rollout.scopes,
        )
        width = rollout.response_ids.shape[1]
        scored = score_objectives(self.objectives, batch, rollout.lengths, rollout.text_lengths, width)
        scores = scored.per_token
        if self.s.missing_eos_penalty:
            unfinished = (~rollout.finished).float() * self.s.missing_eos_penalty
            scores = scores - place_scalar(unfinished, rollout.lengths, width)
        rollout.scores = scores * rollout.response_mask.float()
        return {"means": scored.means, "per_reply": scored.per_reply}

    def advantages(self, rollout: Rollout) -> None:
        s = self.s
        mask = rollout.response_mask.float()
        # filled by annotate() and score()
        assert rollout.scores is not None and rollout.logprobs is not None and rollout.ref_logprobs is not None
        assert rollout.values is not None
        rollout.rewards, rollout.kl = shape_rewards(
            rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, s.kl_coef, s.kl_estimator, s.whiten_rewards
        )
        advantages, returns = gae_advantages(rollout.rewards, rollout.values, mask, s.gamma, s.lam)
        rollout.advantages = masked_whiten(advantages, mask) if s.whiten_advantages else advantages
        rollout.returns = returns

    # ------------------------------------------------------------------ update

    def update(self, rollout: Rollout) -> dict[str, float]:
        s = self.s
        totals: dict[str, float] = {}
        count = 0
        epochs_run = 0
        for _epoch in range(s.ppo_epochs):
            epochs_run += 1
            order = torch.randperm(len(rollout))
            epoch_kl = []
            for start in range(0, len(rollout), s.mini_batch_size):
                mini = rollout.select(order[start : start + s.mini_batch_size])
                mini_tokens = mini.response_mask.sum().clamp(min=1)
                self.optimizer.zero_grad(set_to_none=True)
                stats = {
                    "loss/policy": 0.0,
                    "loss/value": 0.0,
                    "policy/clip_fraction": 0.0,
                    "value/clip_fraction": 0.0,
                    "policy/approx_kl": 0.0,
                    "policy/ratio": 0.0,
                }
                for sl in self._micro_slices(len(mini)):
                    micro = mini.select(torch.arange(len(mini))[sl])
                    weight = micro.response_mask.sum() / mini_tokens
                    out, values = self.models.evaluate(
                        micro.query_ids,
                        micro.query_mask,
                        micro.response_ids,
                        micro.response_mask,
                        s.temperature,
                        want_entropy=bool(s.entropy_coef),
                    )
                    mask = micro.response_mask.float()
                    # filled by annotate() and advantages()
                    assert micro.logprobs is not None and micro.advantages is not None
                    assert micro.values is not None and micro.returns is not None
                    pl = clipped_policy_loss(out.logprobs, micro.logprobs, micro.advantages, mask, s.clip_range)
                    vl = clipped_value_loss(values, micro.values, micro.returns, mask, s.clip_range_value)
                    loss = pl.loss + s.vf_coef * vl.loss
                    if s.entropy_coef:
                        assert out.entropy is not None  # want_entropy=bool(s.entropy_coef)
                        loss = loss - s.entropy_coef * masked_mean(out.entropy, mask)
                    (loss * weight).backward()
                    w = float(weight)
                    for key, value in (
                        ("loss/policy", pl.loss),
                        ("loss/value", vl.loss),
                        ("policy/clip_fraction", pl.clip_fraction),
                        ("value/clip_fraction", vl.clip_fraction),
                        ("policy/approx_kl", pl.approx_kl),
                        ("policy/ratio", pl.ratio_mean),
                    ):
                        stats[key] += w * float(value.detach())
                if s.max_grad_norm:
                    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.trainable, s.max_grad_norm))
                self.optimizer.step()
                self.scheduler.step()
                epoch_kl.append(stats["policy/approx_kl"])
                for key, amount in stats.items():
                    totals[key] = totals.get(key, 0.0) + amount
                count += 1
            if s.target_kl and sum(epoch_kl) / len(epoch_kl) > s.target_kl:
                self.log.info(
                    "step %d: update moved %.4f > target_kl %.4f after %d epoch(s); next rollout",
                    self.state.step + 1,
                    sum(epoch_kl) / len(epoch_kl),
                    s.target_kl,
                    epochs_run,
                )
                break
        result = {k: v / max(count, 1) for k, v in totals.items()}
        result["ppo_epochs_run"] = epochs_run
        result["learning_rate"] = cast(float, self.scheduler.get_last_lr()[0])  # lrs here are floats, not tensors
        return result

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out prompts, one reply each (greedy by default): each objective's score, length,
        and the reply's log-ratio to the reference (its sequence KL estimate when sampled)."""
        if not self.eval_prompts:
            return {}
        rollout = self.sample(self.eval_prompts, 1, self.s.eval_temperature)
        temperature = self.s.eval_temperature or 1.0
        self.annotate(rollout, temperature)
        # reward models with running statistics (reward_models.combine) have `update_stats`;
        # the RewardModel protocol does not declare it
        frozen: list[Any] = [o.model for o in self.objectives if getattr(o.model, "update_stats", False)]
        for model in frozen:  # held-out replies must not move the running reward statistics
            model.update_stats = False
        try:
            scored = self.score(rollout)
        finally:
            for model in frozen:
                model.update_stats = True
        mask = rollout.response_mask.float()
        # filled by annotate() and score()
        assert rollout.logprobs is not None and rollout.ref_logprobs is not None and rollout.scores is not None
        log_ratio = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(1)
        row = {f"eval/reward/{k}": v for k, v in scored["means"].items()}
        row["eval/reward/total"] = float(rollout.scores.sum(1).mean())
        row["eval/kl"] = float(log_ratio.mean())
        row["eval/response_length"] = float(rollout.lengths.float().mean())
        for i, prompt in enumerate(self.eval_prompts):
            sample = {
                "step": self.state.step,
                "prompt_id": prompt.id,
                "prompt": prompt.reward_prompt,
                "response": rollout.texts[i],
                "num_tokens": int(rollout.lengths[i]),
                "finished": bool(rollout.finished[i]),
                "log_ratio": float(log_ratio[i]),
            }
            sample.update({f"reward/{k}": v[i] for k, v in scored["per_reply"].items()})
            self.state.samples.append(sample)
        return row

    # ------------------------------------------------------------------ loop

    def resume(self) -> bool:
        if self.checkpoint_dir is None:
            return False
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        saved = load_checkpoint(path, self.models, self.optimizer, self.scheduler)
        reward_states = saved.pop("reward_states", {})
        for objective in self.objectives:
            if objective.name in reward_states and hasattr(objective.model, "load_state_dict"):
                objective.model.load_state_dict(reward_states[objective.name])
        self.state = LoopState(**saved)
        self.resumed_from = path.name
        self.log.info("resuming PPO from %s (step %d/%d)", path.name, self.state.step, self.s.steps)
        return True

    def checkpoint(self) -> None:
        if self.checkpoint_dir is not None:
            # reward models with running statistics (reward_models.combine) resume with them
            reward_states = {
                o.name: o.model.state_dict()
                for o in self.objectives
                if hasattr(o.model, "state_dict") and not isinstance(o.model, torch.nn.Module)
            }
            save_checkpoint(
                self.checkpoint_dir,
                self.state.step,
                self.models,
                self.optimizer,
                self.scheduler,
                {**self.state.__dict__, "reward_states": reward_states},
                keep=self.s.save_total_limit,
            )

    def step(self) -> dict[str, Any]:
        """One PPO iteration; returns its curve row."""
        s = self.s
        started = time.perf_counter()
        prompts = self.next_prompts()
        rollout = self.sample(prompts, s.samples_per_prompt, s.temperature)
        sampled = time.perf_counter()
        self.annotate(rollout, s.temperature)
        scored = self.score(rollout)
        self.advantages(rollout)
        prepared = time.perf_counter()
        mask = rollout.response_mask.float()
        # filled by annotate(), score() and advantages()
        assert rollout.logprobs is not None and rollout.ref_logprobs is not None and rollout.entropy is not None
        assert rollout.scores is not None and rollout.rewards is not None and rollout.kl is not None
        assert rollout.values is not None and rollout.returns is not None
        k1 = kl_per_token(rollout.logprobs, rollout.ref_logprobs, "k1") * mask
        row: dict[str, Any] = {"step": self.state.step + 1}
        row.update({f"reward/{k}": v for k, v in scored["means"].items()})
        row["reward/total"] = float(rollout.scores.sum(1).mean())
        row["reward/shaped"] = float(rollout.rewards.sum(1).mean())
        row["kl"] = float(k1.sum(1).mean())
        row["kl/penalty"] = float((s.kl_coef * rollout.kl).sum(1).mean())
        row["entropy"] = float(masked_mean(rollout.entropy, mask))
        row["response/length"] = float(rollout.lengths.float().mean())
        row["response/finished"] = float(rollout.finished.float().mean())
        row["value/error"] = float(masked_mean((rollout.values - rollout.returns) ** 2, mask))
        row["value/explained_variance"] = float(explained_variance(rollout.values, rollout.returns, mask))
        row.update(self.update(rollout))
        updated = time.perf_counter()
        generated_tokens = int(rollout.lengths.sum())
        row["time/rollout_s"] = sampled - started
        row["time/score_s"] = prepared - sampled
        row["time/update_s"] = updated - prepared
        row["time/step_s"] = updated - started
        row["rollout/tokens_per_s"] = generated_tokens / max(sampled - started, 1e-9)
        self.state.step += 1
        return row

    def train(self) -> LoopState:
        s = self.s
        self.resume()
        if self.state.step == 0 and self.eval_prompts and not self.state.curves:
            self.state.curves.append({"step": 0, **self.evaluate()})
        started = time.time()
        first_step = self.state.step
        while self.state.step < s.steps and not self.state.stopped:
            row = self.step()
            if self.eval_prompts and (self.state.step % s.eval_every == 0 or self.state.step == s.steps):
                row.update(self.evaluate())
            self.state.curves.append(row)
            done = self.state.step - first_step
            eta = (time.time() - started) / done * (s.steps - self.state.step)
            self.log.info(
                "ppo step %d/%d reward=%.4g kl=%.4g entropy=%.3g len=%.1f clip=%.3f value_err=%.3g %.1fs eta %.0fs",
                self.state.step,
                s.steps,
                row["reward/total"],
                row["kl"],
                row["entropy"],
                row["response/length"],
                row["policy/clip_fraction"],
                row["value/error"],
                row["time/step_s"],
                eta,
            )
            if s.kl_threshold is not None and row["kl"] > s.kl_threshold:
                self.state.kl_over_threshold += 1
                self.log.warning(
                    "step %d: KL to the reference %.3g > kl_threshold %.3g (%d/%d)",
                    self.state.step,
                    row["kl"],
                    s.kl_threshold,
                    self.state.kl_over_threshold,
                    s.kl_patience,
                )
                if self.state.kl_over_threshold >= s.kl_patience:
                    self.state.stopped = f"kl_threshold exceeded {s.kl_patience} times"
                    self.log.warning("stopping early: %s", self.state.stopped)
            if self.state.step % s.save_steps == 0 and self.state.step < s.steps and not self.state.stopped:
                self.checkpoint()
            if self.on_step is not None:
                self.on_step(self.state.step, row)
        if self.state.stopped and self.eval_prompts and "eval/reward/total" not in self.state.curves[-1]:
            self.state.curves[-1].update(self.evaluate())
        return self.state

    def cleanup_checkpoints(self) -> None:
        if self.checkpoint_dir is not None:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


def summary(state: LoopState) -> dict[str, float]:
    """Stage metrics: first/last evaluation and the last rollout's diagnostics."""
    curves = state.curves
    train_rows = [r for r in curves if "kl" in r]
    evals = [r for r in curves if "eval/reward/total" in r]
    out: dict[str, Any] = {"steps": state.step}
    if train_rows:
        last = train_rows[-1]
        for key in ("reward/total", "kl", "entropy", "response/length", "policy/clip_fraction", "value/error"):
            out[f"last_{key.replace('/', '_')}"] = last[key]
        out["max_kl"] = max(r["kl"] for r in train_rows)
        out["seconds_per_step"] = sorted(r["time/step_s"] for r in train_rows)[len(train_rows) // 2]
        out["rollout_tokens_per_s"] = sorted(r["rollout/tokens_per_s"] for r in train_rows)[len(train_rows) // 2]
    if evals:
        out["eval_reward_first"] = evals[0]["eval/reward/total"]
        out["eval_reward_last"] = evals[-1]["eval/reward/total"]
    if state.stopped:
        out["stopped_early"] = state.stopped
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}
