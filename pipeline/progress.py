"""Progress that reads well both in a terminal (rich bar) and in forwarded Ray logs (lines)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], total: int | None = None, desc: str = "working", every_s: float = 10.0) -> Iterator[T]:
    """Yield items while reporting progress: a rich bar on a TTY, else a line every `every_s`."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    if sys.stdout.isatty():
        from rich.progress import track as rich_track

        yield from rich_track(items, total=total, description=desc)
        return
    start = last = time.time()
    for i, item in enumerate(items, 1):
        yield item
        now = time.time()
        if now - last >= every_s or i == total:
            rate = i / max(now - start, 1e-9)
            eta = (total - i) / rate if rate > 0 else 0
            print(f"{desc}: {i}/{total} ({100 * i / max(total, 1):.0f}%) {now - start:.0f}s elapsed, eta {eta:.0f}s", flush=True)
            last = now
