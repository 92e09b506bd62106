"""Is there room in this machine's memory for another copy of a model's weights?

Why: `heedful serve` may hold more than one copy of the same weights to be faster on a CPU: the
linear layers packed for oneDNN beside the originals (pipeline/cpu_linear.py), and CTranslate2's
converted model beside HF's (`hf+ct2`, pipeline/engine_probe.py). For SmolLM2-135M that is a few
hundred MB; for a 7B model in fp32 it is 28 GB a copy, and a server that doubles or triples its
weights without asking would be killed at start-up where it used to run. So each extra copy is
taken only while it would use at most half of the memory available now (`room_for`), and skipped
with a log line otherwise: slower, never out of memory.

Available memory is Linux's `MemAvailable` (/proc/meminfo); where that is not readable (another
OS), the copies are taken as before this check existed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: an extra copy may take at most this share of the memory available when it is made
SHARE = 0.5
_WEIGHT_FILES = ("*.safetensors", "*.bin")


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory available to new allocations without swapping (Linux), or None when unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def room_for(nbytes: int, what: str) -> bool:
    """Whether a copy of `nbytes` fits in `SHARE` of the available memory (True when unknown); says
    so in the log when it does not, naming `what` would have been copied."""
    available = available_bytes()
    if available is None or nbytes <= SHARE * available:
        return True
    log.warning(
        "not keeping %s: it needs %.1f GB and %.1f GB of memory is available (at most %d%% is used for it)",
        what,
        nbytes / 1e9,
        available / 1e9,
        round(100 * SHARE),
    )
    return False


def fp32_bytes(model_folder: str | Path) -> int | None:
    """The bytes of a model's weights in fp32, from its weight files and the dtype its config stores
    them in (an fp32 copy: what CTranslate2 converts to on a CPU); None for a folder that is not there."""
    folder = Path(model_folder)
    if not folder.is_dir():
        return None
    stored = sum(f.stat().st_size for pattern in _WEIGHT_FILES for f in folder.glob(pattern))
    if not stored:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return stored if dtype == "float32" else 2 * stored  # bf16 / fp16: two bytes an element
