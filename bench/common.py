"""What every benchmark shares: the repo on sys.path, offline hub settings, the real data
path, and the machine's measured matmul peak that FLOP/s figures are reported against."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = Path(os.environ.get("HEEDFUL_SHARED_DATA") or ROOT.parent / "shared" / "data")
QA = SHARED_DATA / "qa_feedback" / "feedback_400.json"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


def save_results(result: dict, path: Path) -> None:
    """Write a benchmark's figures to `path` (bench/results/<name>.json) and print them."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
