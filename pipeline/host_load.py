"""Was the machine busy while a probe timed it? The CPU the rest of the machine used meanwhile.

Why: the probes (bf16 or fp32, CTranslate2 or HF, checkpointing or not) time two settings and
cache the faster for every later run on the host. Timed beside a busy process (a test suite, a
second training run, a VM neighbour taking the host's cores), the two settings slow down by
different amounts and the cached answer can flip: it did, CTranslate2 -> HF for the stages'
batches on a 2-core Xeon (stop 39's note). So a probe measures under `watch()`: from /proc/stat,
the share of the machine's CPU time that other processes used (all CPU time counted as busy, less
this process's own, threads included) and the share the hypervisor stole. Past `OTHERS_LIMIT` or
`STEAL_LIMIT` the measurement is `contended`: the answer is used and cached as provisional, and
measured again by the first probe that finds the machine idle (`sample()`, a quarter-second look).
A span too short to tell from /proc/stat's clock ticks is watched on for up to half a second.
Where /proc/stat cannot be read (not Linux) nothing is known and every measurement counts as idle.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

#: other processes using more than this share of the machine's CPU time make a measurement contended
OTHERS_LIMIT = 0.25
#: the hypervisor taking more than this share of it does too
STEAL_LIMIT = 0.10
SAMPLE_SECONDS = 0.25
#: a span shorter than this many clock ticks (all CPUs) is watched on for up to `TAIL_SECONDS` more:
#: /proc/stat counts in ticks (100 a second per CPU), so a 0.1 s probe on 2 cores is 20 ticks, and a
#: few ticks of rounding would be a 10-20% share
MIN_TICKS = 50
TAIL_SECONDS = 0.5


@dataclass
class Load:
    """Shares of the machine's CPU time (all cores) over a span: used by other processes, stolen."""

    others: float
    steal: float

    @property
    def contended(self) -> bool:
        return self.others > OTHERS_LIMIT or self.steal > STEAL_LIMIT

    def as_dict(self) -> dict[str, float]:
        return {"others": round(self.others, 3), "steal": round(self.steal, 3)}


def cpu_ticks(stat: str = "/proc/stat") -> tuple[int, int, int] | None:
    """(busy, steal, total) clock ticks of all CPUs since boot from the `cpu` line; None if unreadable.
    Busy: user, nice, system, irq, softirq (guest time is inside user); idle and iowait are not."""
    try:
        with open(stat) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


class Watch:
    """What `watch()` yields: `load` is set when the block ends (None where nothing could be read)."""

    load: Load | None = None


@contextmanager
def watch(stat: str = "/proc/stat") -> Iterator[Watch]:
    """Measure the block's machine load (`Watch.load`): other processes' share and the stolen share."""
    out = Watch()
    start, own = cpu_ticks(stat), time.process_time()
    yield out
    end, deadline = cpu_ticks(stat), time.monotonic() + TAIL_SECONDS
    while start is not None and end is not None and end[2] - start[2] < MIN_TICKS and time.monotonic() < deadline:
        time.sleep(0.02)  # too short a span to tell: the load just after it, this process sleeping
        end = cpu_ticks(stat)
    own = time.process_time() - own
    if start is None or end is None or end[2] <= start[2]:
        return
    busy, steal, total = (b - a for a, b in zip(start, end, strict=True))
    mine = own * os.sysconf("SC_CLK_TCK")
    out.load = Load(others=max(0.0, busy - mine) / total, steal=steal / total)


def sample(seconds: float = SAMPLE_SECONDS) -> Load | None:
    """The machine's load over `seconds` of this process sleeping (its own share is then ~0)."""
    with watch() as seen:
        time.sleep(seconds)
    return seen.load
