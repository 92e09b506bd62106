"""What every benchmark shares: the repo on sys.path, offline hub settings, the real data
path, and the machine's measured matmul peak that FLOP/s figures are reported against.

Importing it is the bootstrap: a script run as `python bench/x.py` has bench/ on sys.path,
not the repo root, and must not reach the network for a model; both are settled here, once,
before the script imports heedful's packages."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = Path(os.environ.get("HEEDFUL_SHARED_DATA") or ROOT.parent / "shared" / "data")
QA = SHARED_DATA / "qa_feedback" / "feedback_400.json"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def matmul_peak_flops(device: str = "cpu", n: int = 2048, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of one n×n matmul (fp32 on CPU, bf16 on GPU): the yardstick."""
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def steal_share() -> tuple[float, float] | None:
    """(steal ticks, all ticks) of the CPUs so far, from /proc/stat (None elsewhere): the difference
    between two readings is the share of the run the VM's host gave to other machines, which slows
    every arm and makes a figure not the machine's own (`steal_since`)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0.0), sum(fields[:8])  # guest time is already in user and nice


def steal_since(start: tuple[float, float] | None) -> float | None:
    """The share of CPU time stolen by the VM's host since `start` (a `steal_share()` reading)."""
    now = steal_share()
    if start is None or now is None or now[1] <= start[1]:
        return None
    return round((now[0] - start[0]) / (now[1] - start[1]), 3)


def step_timer() -> Any:
    """A transformers `TrainerCallback` that records every optimizer step's wall seconds (`.wall`)
    and this process's CPU seconds (`.cpu`, all its threads), for the training benches' per-step
    figures."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self._start = (0.0, 0.0)

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self._start = (time.perf_counter(), time.process_time())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.wall.append(time.perf_counter() - self._start[0])
            self.cpu.append(time.process_time() - self._start[1])

    return StepTimer()


def save_results(result: dict, path: Path) -> None:
    """Write a benchmark's figures to `path` (bench/results/<name>.json) and print them."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def percentiles(samples: list[float], digits: int = 1) -> dict[str, float]:
    """p50, p99 and mean of latencies in seconds, as milliseconds rounded to `digits`: the one
    latency summary the serving and memory benchmarks report (memory's sub-ms retrievals use 4)."""
    import numpy as np

    a = np.asarray(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), digits),
        "p99_ms": round(float(np.percentile(a, 99)), digits),
        "mean_ms": round(float(a.mean()), digits),
    }


def prepare_serving(model: str, threads: int | None) -> None:
    """What the serving benchmarks do before they start a server: build the `tiny` model once (so
    its first build is not timed) and set torch's CPU threads when asked (1 avoids OpenMP
    spin-waiting on a machine shared with other jobs)."""
    if model == "tiny":
        from pipeline.models import prepare_tiny

        prepare_tiny()
    if threads:
        import torch

        torch.set_num_threads(threads)
