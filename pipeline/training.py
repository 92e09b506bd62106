"""What every trainer stage shares: settings, precision policy, checkpoints, resume, curves,
experiment tracking, and the `TrainerStage` base.

Trainer stages (dpo, kto, c3po, cut, coh, train_reward, ...) build their TRL/transformers
config from `TrainSettings.trainer_kwargs(ctx)` so device/dtype policy, resume and tracking
behave the same. A method's stage config subclasses the method's config (its own defaults,
trainers/<method>_config.py) and `TrainSettings`; its stage class subclasses `TrainerStage`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationInfo, field_validator

from .distributed import DistributedSettings
from .models import DevicePolicy, LoraSettings, ModelUnavailable, device_policy
from .paths import config_path_keys
from .stage import Input, Output, Stage, StageConfig, StageContext
from .tracking import TrackingSettings  # report_to: shared with evaluate and the arena (pipeline/tracking.py)


def warmup_steps(ratio: float) -> float:
    """transformers' `warmup_steps` for a warmup over `ratio` (0..1) of the optimizer steps. Its
    TrainingArguments take a value below 1 as a share of the steps and one of 1 or more as a step count
    (it has no `warmup_ratio` any more), so a ratio of 1.0 passed as it is would warm up for one step;
    it goes as the float just below 1.0, whose ceil(steps x share) is every step."""
    return math.nextafter(1.0, 0.0) if ratio >= 1 else ratio


#: transformers TrainingArguments keys that take a JSON file's path (or a dict): given in `trainer_args`
#: as a string, read beside the config file as every other path in `with:` (pipeline/paths.py). Not
#: `resume_from_checkpoint` (TrainingArguments only carries it; stages resume from their own
#: checkpoints) nor `output_dir` (the stage's checkpoints folder).
TRAINER_PATH_ARGS = frozenset({"deepspeed", "fsdp_config", "accelerator_config"})


class TrainSettings(TrackingSettings):
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

    @field_validator("trainer_args")
    @classmethod
    def _paths_beside_config(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """`deepspeed: ds.json` (and the other `TRAINER_PATH_ARGS`) is the file beside the config."""
        return config_path_keys(value, TRAINER_PATH_ARGS, info)

    def passes(self, rows: int) -> float:
        """How many times the run reads each of `rows` rows (epochs, or max_steps x batch x accumulation / rows).
        Reads the typed fields, not overrides of them in `trainer_args`: for decisions made before a trainer
        exists (KTO's `precompute_ref_log_probs` on TRL's step). The preference core decides its reference
        cache from the trainer's own args (`PackedReference.run_passes`)."""
        if self.max_steps > 0:
            return self.max_steps * self.per_device_train_batch_size * self.gradient_accumulation_steps / max(rows, 1)
        return self.num_train_epochs

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
            warmup_steps=warmup_steps(self.warmup_ratio),
            lr_scheduler_type=self.lr_scheduler_type,
            weight_decay=self.weight_decay,
            logging_steps=self.logging_steps,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            report_to=self.trackers() or "none",
            run_name=f"{ctx.run_name}/{ctx.name}",
            seed=ctx.seed,
            data_seed=ctx.seed,
            disable_tqdm=not sys.stdout.isatty(),
            dataloader_num_workers=0,
            remove_unused_columns=False,
            **policy.trainer_kwargs(self.gradient_checkpointing),
        )
        if "tensorboard" in kwargs["report_to"]:
            # transformers writes under output_dir (the checkpoints, deleted when training ends) unless told
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.work_dir / "tensorboard")
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
NON_SEMANTIC_TRAIN_FIELDS = frozenset(
    {"device", "logging_steps", "save_steps", "save_total_limit", "use_gpu", "distributed", "report_to"}
)

ADAPTER_INPUT = Input(("adapter",), required=False, doc="continue training this adapter")
ADAPTER_OUTPUT = Output("adapter", doc="PEFT LoRA adapter folder")


class TrainerStage(Stage):
    """Base of the stages that train the policy's LoRA adapter with one method.

    It carries what they all share: the optional `adapter` input (continue training; added
    to `inputs` unless a subclass declares its own), the `adapter` output, all CPUs by
    default, the fields that do not change results (left out of the fingerprint), and
    helpers to load the tokenizer and the LoRA policy and to fit. A subclass declares
    `uses`, `summary`, `Config` (the method's config + `TrainSettings`), its data `inputs`,
    and writes `run()`.
    """

    Config: ClassVar[type[StageConfig]] = TrainSettings
    outputs: ClassVar[dict[str, Output]] = {"adapter": ADAPTER_OUTPUT}
    default_num_cpus: ClassVar[float] = float("inf")
    non_semantic_fields: ClassVar[frozenset[str]] = NON_SEMANTIC_TRAIN_FIELDS
    config: TrainSettings

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "adapter" not in cls.inputs:
            cls.inputs = {**cls.inputs, "adapter": ADAPTER_INPUT}

    @property
    def adapter(self) -> Path | None:
        """The adapter to continue training, if one is wired."""
        return self.ctx.input("adapter")

    def tokenizer(self):
        from .models import load_tokenizer

        return load_tokenizer(self.ctx.model, padding_side="right")

    def lora_policy(self):
        """The trainable policy: a new LoRA adapter on the base, or the wired one (trainable)."""
        from .models import load_lora_policy

        return load_lora_policy(self.ctx.model, self.config.policy(), self.config.lora, self.adapter)

    def training_args(self, args_class=None, **method_kwargs: Any):
        """`args_class` (default transformers' TrainingArguments) from TrainSettings plus the method's keys."""
        if args_class is None:
            from transformers import TrainingArguments as args_class
        return args_class(**method_kwargs, **self.config.trainer_kwargs(self.ctx))

    def trl_trainer(self, trainer_class, args_class, dataset, processing_class=None, **extra: Any):
        """A TRL trainer (DPO, KTO, SFT, ...) on the policy: the wired adapter continued (trainable)
        or a new LoRA; `args_class` built from TrainSettings + the method's `trl_kwargs()`."""
        from .models import load_causal_lm

        cfg, adapter = self.config, self.adapter
        method_kwargs = cfg.trl_kwargs() if hasattr(cfg, "trl_kwargs") else {}
        model = load_causal_lm(self.ctx.model, cfg.policy(), adapter=adapter, qlora=cfg.lora.qlora, trainable_adapter=True)
        return trainer_class(
            model=model,
            args=self.training_args(args_class, max_length=cfg.max_length, **method_kwargs),
            train_dataset=dataset,
            processing_class=processing_class if processing_class is not None else self.tokenizer(),
            peft_config=None if adapter else cfg.lora.peft_config(),
            **extra,
        )

    def fit(self, build_trainer) -> dict[str, Any]:
        return fit(self.ctx, self.config, build_trainer)


def log_curves(ctx: StageContext, trackers: list[str], rows: list[dict[str, Any]], step_key: str = "step") -> None:
    """Replay curve rows (one dict per step) to the trackers, for stages with their own
    training loop (ppo); HF-Trainer stages report live through `report_to` instead."""
    from . import tracking

    series = [
        (
            int(row.get(step_key, i)),
            {k: float(v) for k, v in row.items() if k != step_key and isinstance(v, (int, float)) and not isinstance(v, bool)},
        )
        for i, row in enumerate(rows)
    ]
    tracking.log_curves(trackers, ctx.work_dir / "tensorboard", f"{ctx.run_name}/{ctx.name}", series)


def last_checkpoint(ctx: StageContext) -> str | None:
    """The newest *complete* checkpoint: a kill -9 while one is being written leaves a folder
    without trainer_state.json (written last), which cannot be resumed from."""
    import re

    done = [
        p
        for p in ctx.checkpoint_dir.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").is_file()
    ]
    return str(max(done, key=lambda p: int(p.name.split("-")[1]))) if done else None


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


def use_cpu_lora_dropout(model) -> int:
    """Swap PEFT's LoRA dropout for the same dropout with a fast CPU mask (trainers/lora_dropout.py:
    torch's Bernoulli sampler was 16% of a CPU LoRA step with dropout on); a no-op off CPU and at p = 0."""
    from trainers.lora_dropout import use_cpu_lora_dropout as swap

    return swap(model)


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
    use_cpu_lora_dropout(trainer.model)
    trainer.add_callback(progress_callback(ctx))
    output = train_with_resume(trainer, ctx)
    return finish(trainer, ctx, output, output_name)


def finish(
    trainer, ctx: StageContext, train_output, output_name: str = "adapter", keep_checkpoints: bool = False
) -> dict[str, Any]:
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
    if (reference := getattr(trainer, "ref_cache_seconds", None)) is not None:
        # the preference core's reference log-probs, computed before the first step (0 from the cache):
        # not in any step's time, so a per-step cost must add it amortized (bench/dpo_step.py does)
        metrics["reference_seconds"] = round(float(reference), 3)
    tokens = mean_example_tokens(trainer.train_dataset)
    if tokens and metrics.get("train_samples_per_second"):
        metrics["train_tokens_per_second"] = round(tokens * metrics["train_samples_per_second"], 3)
    from .stats import peak_memory_mb

    metrics["peak_memory_mb"] = peak_memory_mb()  # the arena's cost column
    return metrics


def mean_example_tokens(dataset, sample: int = 1000) -> float | None:
    """Mean tokens per training example: every token-id list of up to `sample` examples (a pair's
    prompt, chosen and rejected; C3PO's four prompt/completion pairs; an SFT row's `input_ids`),
    as tokenized before the collator truncates, masks left out. With samples/s, the arena's
    tokens/s cost column; None when the examples are not tokenized up front (TRL tokenizes its
    datasets at construction; heedful's own trainers build token examples)."""
    try:
        n = min(sample, len(dataset))
        rows = dataset.select(range(n)) if hasattr(dataset, "select") else dataset[:n]
    except TypeError:  # an iterable dataset: no length
        return None
    counts = [sum(len(v) for k, v in dict(row).items() if "mask" not in k and _token_ids(v)) for row in rows]
    return sum(counts) / len(counts) if counts and sum(counts) else None


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], int) and not isinstance(value[0], bool)
