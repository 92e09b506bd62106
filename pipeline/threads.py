"""How many CPU threads one piece of heedful's compute uses: torch in a stage, Ray Train workers,
and the CTranslate2 decoder all follow this, so one setting governs them.

A stage runs on as many threads as the CPUs Ray gives it (`resources.num_cpus`; the training and
evaluation stages default to every CPU of the node). `HEEDFUL_NUM_THREADS` caps that for every
stage and engine of a run. Why a cap: beside another busy process (a second pytest-xdist worker, a
second job on a shared host), one OpenMP thread per core spins against it, and each parallel
region waits for its slowest thread. Measured on 2 cores (Xeon), the quickstart test's pipeline
beside a one-thread matmul loop: 366 s with the stages' own thread counts, 126 s capped at 1
(idle: 94 s); its DPO stage alone 27 s vs 8 s (docs/speed.md). `make test` sets it to 1.
"""

from __future__ import annotations

import os

ENV = "HEEDFUL_NUM_THREADS"


def thread_cap() -> int | None:
    """The cap from `HEEDFUL_NUM_THREADS`, or None when it is unset; a bad value is an error
    naming the variable (a typo must not silently mean "every core")."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV}={value!r}: expected a whole number of threads >= 1")
    return int(value)


def threads_for(cpus: float) -> int:
    """Threads for work given `cpus` CPUs: at least one, at most the cap."""
    n = max(1, int(cpus))
    cap = thread_cap()
    return min(n, cap) if cap else n


def set_torch_threads(cpus: float) -> int:
    """torch's intra-op threads for work given `cpus` CPUs (see `threads_for`); returns them."""
    import torch

    n = threads_for(cpus)
    torch.set_num_threads(n)
    return n


def engine_threads() -> int:
    """A decoder's threads (CTranslate2): the cap when set, else what torch uses in this process --
    inside a stage, what the executor set for its CPUs; elsewhere OMP_NUM_THREADS or the cores."""
    cap = thread_cap()
    if cap:
        return cap
    import torch

    return max(1, torch.get_num_threads())
