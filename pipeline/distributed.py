"""Multi-worker training: every Ray Train worker runs the stage's own `build_trainer()`.

`fit()` (pipeline/training.py) hands over here when `num_workers > 1`. Ray Train's
TorchTrainer starts the workers and sets up torch.distributed (gloo on CPU, nccl on GPU)
plus the RANK/WORLD_SIZE variables accelerate reads, so the HF/TRL trainer a stage builds
runs DDP -- or FSDP / DeepSpeed ZeRO through accelerate when `distributed.strategy` says
so -- without the stage knowing. Each checkpoint the trainer saves is reported to Ray
Train; when a worker dies, Ray Train restarts the group (FailureConfig.max_failures) and
training resumes from the last reported checkpoint. Rank 0 writes the stage outputs, so
the run folder must be on a filesystem every node sees (as for any multi-node heedful run).

Only pydantic (and the light pipeline.paths) is imported at module level: stage configs import `DistributedSettings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .paths import ConfigPath

#: rank 0 leaves its summary here for the coordinating stage process, which removes it
METRICS_FILE = ".distributed-metrics.json"

#: ZeRO through accelerate; "auto" lets the HF trainer fill batch sizes, precision, clipping
DEFAULT_DEEPSPEED = {
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


class DistributedSettings(BaseModel):
    """How `num_workers > 1` runs: strategy, failure handling, per-worker resources."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    fsdp: str = Field(default="full_shard auto_wrap", description="HF `fsdp` option string (strategy fsdp)")
    fsdp_config: dict[str, Any] = Field(default_factory=dict, description="HF `fsdp_config` (FSDP2 unless version: 1)")
    deepspeed: dict[str, Any] | ConfigPath | None = Field(
        default=None, description="DeepSpeed config dict or JSON path; default ZeRO stage `zero_stage`"
    )
    zero_stage: Literal[1, 2, 3] = 2
    max_failures: int = Field(default=2, ge=-1, description="worker-group restarts before the stage fails (-1: no limit)")
    cpus_per_worker: float | None = Field(default=None, gt=0, description="default: the stage's resources.num_cpus")
    gpus_per_worker: float | None = Field(default=None, gt=0, description="default 1 when use_gpu")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    storage_path: ConfigPath | None = Field(
        default=None, description="Ray Train checkpoint storage (e.g. s3://...); default: the stage's checkpoints folder"
    )

    def trainer_kwargs(self) -> dict[str, Any]:
        """TrainingArguments keys that select the strategy (DDP needs none: accelerate sees WORLD_SIZE)."""
        if self.strategy == "fsdp":
            return {"fsdp": self.fsdp, "fsdp_config": dict(self.fsdp_config)}
        if self.strategy == "deepspeed":
            if importlib.util.find_spec("deepspeed") is None:
                raise RuntimeError("distributed.strategy: deepspeed needs the deepspeed package: pip install deepspeed")
            config = self.deepspeed
            if config is None:
                config = json.loads(json.dumps(DEFAULT_DEEPSPEED))
                config["zero_optimization"]["stage"] = self.zero_stage
            return {"deepspeed": config}
        return {}


@dataclasses.dataclass
class WorkerJob:
    """What every Ray Train worker receives (pickled with cloudpickle by Ray)."""

    ctx: Any  # StageContext
    settings: Any  # TrainSettings
    build_trainer: Callable[[], Any]
    output_name: str
    cpus_per_worker: float


# ----------------------------------------------------------------------------- coordinator


def fit_distributed(ctx, settings, build_trainer, output_name: str = "adapter") -> dict[str, Any]:
    """Train with `settings.num_workers` Ray Train workers; return rank 0's summary metrics.

    Runs inside the stage's own process (a Ray task that holds no resources of its own, see
    the runner) or, without Ray, starts a private loopback Ray for the duration.
    """
    import os

    import ray

    from . import cluster

    # Ray Train's print patch bypasses redirected stdout (dill's capture inside `datasets`
    # hashing then dumps bytecode into the logs); propagated to the workers from here.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    started_here = False
    if not ray.is_initialized():
        started_here = bool(cluster.connect(None).get("local"))
    try:
        trainer = _torch_trainer(ctx, settings, build_trainer, output_name)
        ctx.log.info(
            "training with %d Ray Train workers (%s, %s)",
            settings.num_workers,
            settings.distributed.strategy,
            "GPU" if trainer.scaling_config.use_gpu else "CPU/gloo",
        )
        trainer.fit()
    finally:
        if started_here:
            cluster.shutdown()
    metrics_path = ctx.work_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise RuntimeError(
            f"Ray Train finished but rank 0 left no summary at {metrics_path}: "
            "is the run folder on a filesystem shared by all nodes?"
        )
    metrics = json.loads(metrics_path.read_text())
    metrics_path.unlink()
    shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
    return metrics


def resolve_use_gpu(settings) -> bool:
    """use_gpu None means: GPUs when the cluster has any (and the stage is not pinned to CPU)."""
    if settings.use_gpu is not None:
        return settings.use_gpu
    if settings.device == "cpu":
        return False
    from . import cluster

    return cluster.total_gpus() > 0


def worker_cpus(settings, ctx) -> float:
    """CPUs per worker: explicit setting, else the stage's per-worker share, clamped to fit the cluster."""
    if settings.distributed.cpus_per_worker:
        return settings.distributed.cpus_per_worker
    import ray

    from . import cluster

    total = float(ray.cluster_resources().get("CPU", 1.0))
    wanted = float(max(1, ctx.num_threads))
    return max(0.01, min(wanted, cluster.max_cpus_per_node(), total / settings.num_workers))


def _torch_trainer(ctx, settings, build_trainer, output_name: str):
    from ray import cloudpickle
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = resolve_use_gpu(settings)
    cpus = worker_cpus(settings, ctx)
    resources: dict[str, float] = {"CPU": cpus}
    if use_gpu:
        resources["GPU"] = settings.distributed.gpus_per_worker or 1.0
    storage = settings.distributed.storage_path or str(ctx.checkpoint_dir / "ray_train")
    job = WorkerJob(ctx, settings, build_trainer, output_name, cpus)
    return TorchTrainer(
        _train_worker,
        # pickled here so Ray Train's controller passes bytes along instead of importing
        # torch/transformers/trl just to unpickle the stage's closure (~10 s per start)
        train_loop_config={"job": cloudpickle.dumps(job)},
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=settings.distributed.placement_strategy,
        ),
        run_config=RunConfig(
            name=f"{ctx.run_name}-{ctx.name}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=settings.distributed.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.save_total_limit),
        ),
    )


# ----------------------------------------------------------------------------- workers


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the trainer, resume from Ray Train's checkpoint, train."""
    import ray.train
    from ray import cloudpickle
    from transformers.trainer_callback import PrinterCallback

    from .threads import set_torch_threads
    from .training import last_checkpoint, progress_callback, summarize, use_cpu_lora_dropout

    job: WorkerJob = cloudpickle.loads(config["job"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    ctx = dataclasses.replace(job.ctx, log=_worker_logger(job.ctx, rank), extra={})
    set_torch_threads(job.cpus_per_worker)
    _quiet_progress_bars()

    trainer = job.build_trainer()
    use_cpu_lora_dropout(trainer.model)
    trainer.remove_callback(PrinterCallback)
    if rank == 0:
        trainer.add_callback(progress_callback(ctx))
    trainer.add_callback(_report_callback(rank))

    with contextlib.ExitStack() as stack:
        reported = ray.train.get_checkpoint()
        resume = stack.enter_context(reported.as_directory()) if reported is not None else last_checkpoint(ctx)
        resumed_step = _checkpoint_step(resume)
        if resume:
            ctx.log.info("rank %d resuming from step %d (%s)", rank, resumed_step, Path(resume).name)
        output = trainer.train(resume_from_checkpoint=resume)
    # every rank takes part: FSDP/DeepSpeed gather the full state; only rank 0 writes files
    trainer.save_model(str(ctx.output(job.output_name)))
    if rank == 0:
        from .artifacts import atomic_write_json

        metrics = summarize(trainer, ctx, output)
        metrics.update(num_workers=world, resumed_from_step=resumed_step)
        atomic_write_json(ctx.work_dir / METRICS_FILE, metrics)


def _report_callback(rank: int):
    from transformers import TrainerCallback

    class ReportToRayTrain(TrainerCallback):
        """After each HF checkpoint: rank 0 reports it to Ray Train (all ranks must call report)."""

        def on_save(self, args, state, control, **kwargs):
            import ray.train
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its RNG state into the folder
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            metrics: dict[str, Any] = {"step": state.global_step}
            for row in reversed(state.log_history):
                if "loss" in row:
                    metrics["loss"] = float(row["loss"])
                    break
            checkpoint = ray.train.Checkpoint.from_directory(str(path)) if rank == 0 and path.is_dir() else None
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=path.name, delete_local_checkpoint_after_upload=False
            )

    return ReportToRayTrain()


def _checkpoint_step(path: str | None) -> int:
    if not path:
        return 0
    state = Path(path) / "trainer_state.json"
    try:
        return int(json.loads(state.read_text()).get("global_step", 0))
    except (OSError, ValueError):
        return 0


def _worker_logger(ctx, rank: int) -> logging.Logger:
    """Rank 0 logs progress to stdout (Ray forwards it) and appends to the stage log."""
    log = logging.getLogger(f"heedful.stage.{ctx.name}.rank{rank}")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    formatter = logging.Formatter(f"[{ctx.name} rank {rank}] %(message)s")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(formatter)
    log.addHandler(stream)
    if rank == 0:
        file = logging.FileHandler(ctx.work_dir / "stage.log", encoding="utf-8")
        file.setFormatter(formatter)
        log.addHandler(file)
    return log


def _quiet_progress_bars() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
