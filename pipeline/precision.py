"""Which precision a CPU computes in: bf16 where the CPU has bf16 units and they pay, else fp32.

Why not always fp32: on CPUs without bf16 instructions bf16 matmuls are emulated and about 13x
slower than fp32, so heedful ran fp32 on every CPU. But CPUs with AVX512_BF16 or AMX (AMD EPYC
Zen 4/5, Intel Xeon from Sapphire Rapids) run them several times faster than fp32: on an AMD EPYC
with AVX512_BF16, 2 threads, `[2048, 576] x [576, 1536]` went 178 -> 432 GFLOP/s and the
49k-vocabulary head's `[256, 576] x [576, 49152]` 76 -> 384, which made SmolLM2-135M's LoRA step
1.5-1.9x and HF `generate` 1.8x faster (docs/speed.md). That is what a GPU gets already (the
device policy picks bf16 on capable GPUs), so a CPU that can should too.

`auto` (the default): no bf16 flag in /proc/cpuinfo means fp32, unmeasured. With one, the first
use on a host times one body-shaped matmul in each dtype (about 0.1 s) and keeps bf16 only if
it is at least `MARGIN` faster; the answer is cached per host, CPU model and thread count in
`<heedful cache>/cache/precision_probe.json`, as the checkpointing and engine probes cache theirs;
timed while the machine was busy, it is provisional and measured again once it is idle
(pipeline/host_load.py).

What bf16 changes: weights load in bf16, trainers run under bf16 autocast with LoRA's weights in
fp32 and the preference core's reductions in fp32 (trainers/fastpref/logps.py), as on a GPU.
Replies and losses differ slightly from fp32 ones, as they do between machines; each stage's
manifest records the host's answer (`host.cpu_precision`: what its CPU models computed in, except a
CTranslate2 engine's, always fp32).

`HEEDFUL_CPU_PRECISION=fp32|bf16|auto` answers without measuring: a fleet that knows its
machines, a run that must match an fp32 one, or the test suite (it pins fp32 for the comparisons
with hand computations and TRL, and tests bf16 on its own: tests/test_precision.py).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from trainers.grad_ckpt_probe import cached_entry, known_entry, probe_key, stamp, store

CACHE_NAME = "precision_probe.json"
ENV = "HEEDFUL_CPU_PRECISION"
#: bf16 is chosen only when its matmul runs at least this many times fp32's speed: below that, the
#: lost precision is not worth it (measured 2.4x where it exists; ~0.08x where it is emulated)
MARGIN = 1.5
#: /proc/cpuinfo flags of CPUs that compute bf16 products natively
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: the probe's matmul: one SmolLM2-sized MLP projection of 512 positions
PROBE_SHAPE = (512, 576, 1536)
_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}

log = logging.getLogger(__name__)


def default_cache_path() -> Path:
    from pipeline.paths import cache_dir

    return cache_dir() / CACHE_NAME


def dtype_name(value: str) -> str:
    """'float32' or 'bfloat16' for fp32/float32/bf16/bfloat16; a clear error otherwise."""
    name = _NAMES.get(value.strip().lower())
    if name is None:
        raise ValueError(f"CPU precision {value!r}: expected fp32 or bf16")
    return name


def forced_precision() -> str | None:
    """HEEDFUL_CPU_PRECISION's dtype name ('float32' or 'bfloat16'), or None when unset or auto
    (a bad value is an error naming the variable)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in _NAMES:
        raise ValueError(f"{ENV}={value!r}: expected fp32, bf16 or auto")
    return _NAMES[value]


def has_bf16_units(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU lists an instruction set with native bf16 products."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return any(flag in line.split() for flag in BF16_FLAGS)
    except OSError:
        pass
    return False


def _key() -> str:
    import torch

    return probe_key("matmul", f"precision|threads={torch.get_num_threads()}")


def known_cpu_precision(*, cache_path: Path | None = None) -> str | None:
    """The forced or cached answer, or 'float32' on a CPU without bf16 units; None when only a
    measurement could say (nothing is measured here)."""
    if (forced := forced_precision()) is not None:
        return forced
    if not has_bf16_units():
        return "float32"
    known = known_entry(cache_path or default_cache_path(), _key())
    return None if known is None else str(known["precision"])


def cpu_precision(*, cache_path: Path | None = None) -> str:
    """'float32' or 'bfloat16' for this host: forced, cached, or measured now and cached."""
    if (forced := forced_precision()) is not None:
        return forced
    if not has_bf16_units():
        return "float32"
    from filelock import FileLock

    from .host_load import watch

    path = cache_path or default_cache_path()
    if (known := cached_entry(path, _key())) is not None:  # a provisional answer on an idle machine is not
        return str(known["precision"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # processes starting at once measure once
        if (known := cached_entry(path, _key())) is not None:
            return str(known["precision"])
        with watch() as seen:
            seconds = _measure()
        speedup = seconds["float32"] / seconds["bfloat16"]
        precision = "bfloat16" if speedup >= MARGIN else "float32"
        log.info(
            "precision probe: a %s matmul took %.4f s in fp32, %.4f s in bf16 (%.2fx) -> %s",
            "x".join(map(str, PROBE_SHAPE)),
            seconds["float32"],
            seconds["bfloat16"],
            speedup,
            precision,
        )
        entry = {"precision": precision, "bf16_vs_fp32": round(speedup, 3), "seconds": seconds, "measured": time.time()}
        store(path, _key(), stamp(entry, seen.load, path, _key(), "precision", log))
    return precision


def _measure(repeats: int = 8) -> dict[str, float]:
    """Best seconds of the probe's matmul in each dtype, alternating so a drift hits both alike."""
    import torch

    m, k, n = PROBE_SHAPE
    best = {"float32": float("inf"), "bfloat16": float("inf")}
    operands = {name: (torch.randn(m, k).to(getattr(torch, name)), torch.randn(k, n).to(getattr(torch, name))) for name in best}
    for a, b in operands.values():  # warm-up: oneDNN builds its kernels on first use
        a @ b
    for _ in range(repeats):
        for name, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(s, 6) for name, s in best.items()}
