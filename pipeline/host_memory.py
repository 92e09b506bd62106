"""Is there room in this machine's memory for another copy of a model's weights?

Why: `heedful serve` may hold more than one copy of the same weights to be faster on a CPU: the
linear layers packed for oneDNN beside the originals (pipeline/cpu_linear.py), and CTranslate2's
converted model beside HF's (`hf+ct2`, pipeline/engine_probe.py). For SmolLM2-135M that is a few
hundred MB; for a 7B model in fp32 it is 28 GB a copy, and a server that doubled or tripled its
weights without asking would be killed at start-up where it used to run. So each extra copy is
taken only while it would use at most half of the memory left beside what must be held anyway
(`room_for`), and skipped with a log line otherwise. An estimate, not a guarantee: activations, the
tokenizer and the server's own memory come on top, and several processes starting at once each see
the same free memory.

Available memory: Linux's `MemAvailable`, capped by the cgroup's limit less its usage where the
process runs in a container (v2 `memory.max`, v1 `memory.limit_in_bytes`), since a container's
/proc/meminfo shows the host's memory. Where neither is readable (another OS) the copies are taken
as before this check existed, and so are they for a model whose size cannot be told.
"""

from __future__ import annotations

import json
import logging
import struct
from math import prod
from pathlib import Path

log = logging.getLogger(__name__)

#: an extra copy may take at most this share of the memory left beside what must be held anyway
SHARE = 0.5
_CGROUP_LIMITS = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def available_bytes(meminfo: Path = Path("/proc/meminfo"), cgroups=_CGROUP_LIMITS) -> int | None:
    """Memory this process can still allocate without swapping or its container's limit, or None
    when unknown."""
    found: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in cgroups:
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
            if limit.isdigit() and int(limit) < 2**60:  # "max" / a huge v1 value: no limit
                found.append(max(0, int(limit) - int(usage)))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def room_for(nbytes: int, what: str, besides: int = 0) -> bool:
    """Whether a copy of `nbytes` fits in `SHARE` of the available memory less `besides` (what must be
    held anyway and is not loaded yet); True when unknown. Says so in the log when it does not,
    naming `what` would have been copied."""
    available = available_bytes()
    if available is None or nbytes <= SHARE * (available - besides):
        return True
    log.warning(
        "not keeping %s: it needs %.1f GB, and %.1f GB of memory is available%s (at most %d%% of it is used for a copy)",
        what,
        nbytes / 1e9,
        available / 1e9,
        f" with {besides / 1e9:.1f} GB more to load" if besides else "",
        round(100 * SHARE),
    )
    return False


def fp32_bytes(model: str | Path) -> int | None:
    """A model's weights in fp32 (what CTranslate2 converts to on a CPU), in bytes: from the tensor
    shapes in its safetensors headers (no tensor is read), else its `.bin` files' size and the dtype
    its config stores them in. `model`: a folder, or a hub id already in the local HF cache; None when
    neither (the size cannot be told)."""
    folder = _local_folder(model)
    if folder is None:
        return None
    index = folder / "model.safetensors.index.json"
    try:
        shards = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    except (OSError, ValueError, KeyError):
        shards = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if shards:
        try:
            return 4 * sum(_safetensors_elements(shard) for shard in shards)
        except (OSError, ValueError):
            return None
    bins = [f for f in folder.glob("*.bin") if f.name != "training_args.bin"]
    if not bins:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    stored = sum(f.stat().st_size for f in bins)
    return stored * 2 if dtype in ("bfloat16", "float16") else stored


def _safetensors_elements(path: Path) -> int:
    """Elements of every tensor in a safetensors file, from its JSON header."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


def _local_folder(model: str | Path) -> Path | None:
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    try:  # a hub id: its snapshot in the local cache, never a download
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception:  # not cached, not a hub id, no huggingface_hub: the size cannot be told
        return None
