"""The CTranslate2 conversion cache: bounded, least recently used out, never what is in use.

Why: every adapter the ct2 engine runs is converted once (base + adapter merged) and kept
under `$HEEDFUL_HOME/ct2/<key>`, so reruns and other stages reuse it. Unbounded, that
filled a disk (SmolLM2-135M: ~540 MB a conversion; an arena of ten methods converts ten
adapters per run; one machine collected 53 GB). Each time a conversion is loaded the cache is cut
back to `HEEDFUL_CT2_CACHE_GB` (default 16), oldest use first.

A conversion in use is never removed: whoever loads one holds a shared `flock` on its
`<key>.use` file for as long as it may read the folder again (a `Ct2Generator` reloads its
weights for every seeded call), and eviction takes that lock exclusively without waiting,
skipping the entry when it cannot. A conversion being built holds `<key>.lock` (see
`models._build_once`); eviction skips that too. Use is recorded as the folder's mtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:  # POSIX; elsewhere conversions are not protected while in use (documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: the default budget, in GB (10^9 bytes), for all conversions together
DEFAULT_BUDGET_GB = 16.0
#: a conversion is complete when this file is in its folder
MARKER = "model.bin"


def budget_bytes() -> int:
    """`HEEDFUL_CT2_CACHE_GB` (default 16) in bytes; 0 keeps only the conversions in use."""
    raw = os.environ.get("HEEDFUL_CT2_CACHE_GB", "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_BUDGET_GB
    except ValueError:
        raise ValueError(f"HEEDFUL_CT2_CACHE_GB must be a number of GB (got {raw!r})") from None
    return gb_to_bytes(gb, "HEEDFUL_CT2_CACHE_GB")


def gb_to_bytes(gb: float, what: str) -> int:
    if not math.isfinite(gb) or gb < 0:
        raise ValueError(f"{what} must be a finite number of GB >= 0 (got {gb})")
    return int(gb * 1e9)


#: conversions this process holds (folder -> number of holders): eviction in this process skips
#: them whatever the file system's `flock` does (over NFS it is per process, so a process's own
#: exclusive probe would succeed against its own shared lock, and closing the probe would drop it)
_HELD: dict[Path, int] = {}


class InUse:
    """A shared lock on one conversion: eviction leaves it alone until `release()` (or garbage collection).

    A cache another user owns, or a read-only one, is still usable: the lock file is opened
    read-only there (`flock` works on it); where it cannot be opened at all the conversion is
    used unprotected (the owner's evictions could remove it), and that is logged."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        fd = _open_lock_file(_use_file(folder)) if fcntl is not None else None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        elif fcntl is not None:
            log.warning("cannot open %s: this conversion is used without protection from eviction", _use_file(folder))
        _HELD[self.folder] = _HELD.get(self.folder, 0) + 1
        self._finalizer = weakref.finalize(self, _let_go, self.folder, fd)

    def release(self) -> None:
        self._finalizer()


def _let_go(folder: Path, fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
    count = _HELD.get(folder, 0) - 1
    if count > 0:
        _HELD[folder] = count
    else:
        _HELD.pop(folder, None)


def _open_lock_file(path: Path) -> int | None:
    """The lock file for reading and writing, created if missing; read-only where that is all we may do."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(path, flags, 0o644)
        except OSError:
            continue
    return None


def _use_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".use")


def mark_used(folder: Path) -> None:
    """Record a use (the folder's mtime) so the least recently used goes first.

    The clock's own nanoseconds: `utime` without a time stamps the kernel's coarse clock (a few
    ms), so two uses close together would tie."""
    now = time.time_ns()
    with contextlib.suppress(OSError):  # gone meanwhile, or another user's (only the owner may set times)
        os.utime(folder, ns=(now, now))


@dataclass(frozen=True)
class Entry:
    folder: Path
    size: int
    #: nanoseconds since the epoch
    last_used: int
    #: the merged adapter's folder (absolute; None: the base model alone, or unrecorded)
    adapter: Path | None

    @property
    def orphaned(self) -> bool:
        """Its adapter folder is gone, so no lookup can hit it again (the key holds the adapter's path)."""
        return self.adapter is not None and not self.adapter.exists()


def _adapter_of(folder: Path) -> Path | None:
    try:
        adapter = json.loads((folder / "heedful_ct2.json").read_text()).get("adapter")
    except (OSError, ValueError):
        return None
    return Path(adapter) if adapter and Path(adapter).is_absolute() else None


def entries(root: Path) -> list[Entry]:
    """The complete conversions under `root`, least recently used first."""
    found: list[Entry] = []
    if not root.is_dir():
        return found
    for folder in root.iterdir():
        # only finished conversions: not `<key>.tmp` (a build under way) nor `<key>.evicted-*`
        if "." in folder.name or not folder.is_dir() or not (folder / MARKER).is_file():
            continue
        try:
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            found.append(Entry(folder, size, folder.stat().st_mtime_ns, _adapter_of(folder)))
        except FileNotFoundError:  # removed meanwhile by another process
            continue
    return sorted(found, key=lambda e: e.last_used)


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[bool]:
    """True inside when nobody uses or builds `folder` (both locks taken without waiting)."""
    from filelock import FileLock, Timeout

    build = FileLock(str(folder) + ".lock")
    try:
        build.acquire(timeout=0)
    except (Timeout, OSError):  # being built, or not ours to lock (a read-only or another user's cache)
        yield False
        return
    try:
        if folder.resolve() in _HELD:  # this process uses it
            yield False
            return
        if fcntl is None:
            yield True
            return
        fd = _open_lock_file(_use_file(folder))
        if fd is None:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            yield True
        finally:
            os.close(fd)
    finally:
        build.release()


def discard(folder: Path) -> bool:
    """Remove one conversion unless it is in use or being built; True when it went.

    The folder is renamed away under both locks before it is deleted, so nobody loads half of one."""
    with _exclusive(folder) as free:
        if not free or not (folder / MARKER).is_file():
            return False
        doomed = folder.with_name(f"{folder.name}.evicted-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def evict(root: Path, budget: int | None = None, keep: Path | None = None) -> list[Path]:
    """Cut the conversions under `root` back to `budget` bytes; returns the folders removed.

    Orphans (their adapter folder deleted) go first, whatever the budget; then the least
    recently used. `keep` (the conversion just made) and any conversion in use or being built
    stay, so the cache may stay over budget while they are all needed."""
    budget = budget_bytes() if budget is None else budget
    for leftover in root.glob("*.evicted-*"):  # an eviction interrupted while deleting
        shutil.rmtree(leftover, ignore_errors=True)
    found = entries(root)
    orphans = {e.folder for e in found if e.orphaned}
    total = sum(e.size for e in found)
    removed = []
    for entry in sorted(found, key=lambda e: e.folder not in orphans):  # stable: orphans, then by last use
        if total <= budget and entry.folder not in orphans:
            break
        if keep is not None and entry.folder.resolve() == keep.resolve():
            continue
        if discard(entry.folder):
            total -= entry.size
            removed.append(entry.folder)
    return removed
