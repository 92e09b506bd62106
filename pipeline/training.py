"""What every trainer stage shares: settings, precision policy, checkpoints, resume, curves.

Trainer stages (dpo, c3po, cut, coh, train_reward, ...) build their TRL/transformers config
from `TrainSettings.trainer_kwargs(ctx)` so device/dtype policy and resume behave the same.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from .distributed import DistributedSettings
from .models import DevicePolicy, LoraSettings, ModelUnavailable, device_policy
from .stage import StageConfig, StageContext


class TrainSettings(StageConfig):
    """Common optimisation settings; `trainer_args` passes anything else to the TRL config."""

    learning_rate: float = Field(default=5e-5, gt=0)
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, description="overrides epochs when > 0")
    per_device_train_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    warmup_ratio: float = Field(default=0.0, ge=0, le=1)
    lr_scheduler_type: str = "linear"
    weight_decay: float = Field(default=0.0, ge=0)
    max_length: int = Field(default=512, ge=8)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    gradient_checkpointing: bool | None = Field(default=None, description="default: on for GPU, off for CPU")
    logging_steps: int = Field(default=1, ge=1)
    save_steps: int = Field(default=25, ge=1, description="checkpoint interval (resume granularity)")
    save_total_limit: int = Field(default=2, ge=1)
    device: str | None = None
    optim: str | None = Field(default=None, description="optimizer, e.g. paged_adamw_8bit / adamw_8bit (bitsandbytes)")
    num_workers: int = Field(default=1, ge=1, description="> 1: DDP/FSDP/DeepSpeed across Ray Train workers")
    use_gpu: bool | None = Field(default=None, description="default: GPUs when the stage/cluster has them")
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    trainer_args: dict[str, Any] = Field(default_factory=dict, description="extra TRL/transformers config keys")

    def policy(self) -> DevicePolicy:
        return device_policy(self.device or ("cpu" if self.use_gpu is False else None))

    def trainer_kwargs(self, ctx: StageContext) -> dict[str, Any]:
        policy = self.policy()
        kwargs: dict[str, Any] = dict(
            output_dir=str(ctx.checkpoint_dir),
            learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            warmup_steps=self.warmup_ratio,
            lr_scheduler_type=self.lr_scheduler_type,
            weight_decay=self.weight_decay,
            logging_steps=self.logging_steps,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            report_to="none",
            seed=ctx.seed,
            data_seed=ctx.seed,
            disable_tqdm=not sys.stdout.isatty(),
            dataloader_num_workers=0,
            remove_unused_columns=False,
            **policy.trainer_kwargs(self.gradient_checkpointing),
        )
        if self.optim:
            if _needs_bitsandbytes(self.optim) and importlib.util.find_spec("bitsandbytes") is None:
                raise ModelUnavailable(f"optim: {self.optim} needs bitsandbytes: pip install bitsandbytes")
            kwargs["optim"] = self.optim
        if self.num_workers > 1:
            kwargs.update(self.distributed.trainer_kwargs())
        kwargs.update(self.trainer_args)
        return kwargs


def _needs_bitsandbytes(optim: str) -> bool:
    return ("paged" in optim or "bnb" in optim or optim.endswith("8bit")) and "torch" not in optim and "galore" not in optim


#: how to run, not what is learned: changing these does not rerun a finished stage
NON_SEMANTIC_TRAIN_FIELDS = frozenset({"device", "logging_steps", "save_steps", "save_total_limit", "use_gpu", "distributed"})


def last_checkpoint(ctx: StageContext) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ctx.checkpoint_dir))


def progress_callback(ctx: StageContext):
    """Line-based progress with loss and ETA (readable in forwarded Ray logs)."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self):
            self.start = time.time()
            self.first_step = None
            self.step_started = 0.0
            self.step_seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds.append(time.perf_counter() - self.step_started)
            ctx.extra["step_seconds"] = self.step_seconds

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            if self.first_step is None:
                self.first_step = state.global_step - 1
            done = state.global_step - self.first_step
            elapsed = time.time() - self.start
            eta = elapsed / max(done, 1) * (state.max_steps - state.global_step)
            keys = [k for k in ("loss", "rewards/margins", "rewards/accuracies", "learning_rate") if k in logs]
            keys += [k for k in logs if k not in keys and k.startswith(("loss/", "reward", "kl"))][:4]
            shown = " ".join(f"{k}={logs[k]:.4g}" for k in keys if isinstance(logs[k], (int, float)) and not math.isnan(logs[k]))
            ctx.log.info("step %d/%d %s eta %.0fs", state.global_step, state.max_steps, shown, eta)

    return _Progress()


def train_with_resume(trainer, ctx: StageContext) -> Any:
    """`trainer.train()`, resuming from the stage's last checkpoint if an attempt was interrupted."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our progress callback prints a compact line instead
    checkpoint = last_checkpoint(ctx)
    if checkpoint:
        ctx.log.info("resuming from %s", Path(checkpoint).name)
    return trainer.train(resume_from_checkpoint=checkpoint)


def fit(ctx: StageContext, settings: TrainSettings, build_trainer, output_name: str = "adapter") -> dict[str, Any]:
    """Build a trainer with `build_trainer()`, train it (resuming if interrupted), save the
    adapter to `ctx.output(output_name)`, the curves, and return summary metrics.

    Trainer stages call this instead of `trainer.train()` so that progress, resume and
    (multi-worker) execution behave the same for every method. `build_trainer` must be
    self-contained (load model and data inside) so it can run in another process: with
    `settings.num_workers > 1` every Ray Train worker calls it (pipeline/distributed.py).
    """
    if getattr(settings, "num_workers", 1) > 1:
        from .distributed import fit_distributed

        return fit_distributed(ctx, settings, build_trainer, output_name)
    trainer = build_trainer()
    trainer.add_callback(progress_callback(ctx))
    output = train_with_resume(trainer, ctx)
    return finish(trainer, ctx, output, output_name)


def finish(trainer, ctx: StageContext, train_output, output_name: str = "adapter", keep_checkpoints: bool = False) -> dict[str, Any]:
    """Save the adapter, curves and summary metrics; drop checkpoints once complete."""
    import shutil

    trainer.save_model(str(ctx.output(output_name)))
    metrics = summarize(trainer, ctx, train_output)
    if not keep_checkpoints:
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
    return metrics


def summarize(trainer, ctx: StageContext, train_output) -> dict[str, Any]:
    """Write the curves; summary metrics from the log history (shared with rank 0 of multi-worker runs)."""
    history = [dict(row) for row in trainer.state.log_history]
    ctx.save_curves(history)
    metrics: dict[str, Any] = {"steps": trainer.state.global_step}
    metrics.update({k: v for k, v in train_output.metrics.items() if isinstance(v, (int, float))})
    losses = [row["loss"] for row in history if "loss" in row]
    if losses:
        metrics["first_loss"], metrics["last_loss"] = losses[0], losses[-1]
    for row in reversed(history):
        for key, value in row.items():
            if key.startswith("rewards/") and key not in metrics:
                metrics[key] = value
    steps = sorted(ctx.extra.get("step_seconds", []))
    if steps:
        metrics["seconds_per_step"] = steps[len(steps) // 2]  # median: robust to the warm-up step
    return metrics
