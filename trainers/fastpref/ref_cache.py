"""Reference log-probs computed once and kept on disk, keyed by what determines them.

Why: DPO's reference is frozen (the base with the adapter off, or the adapter a run
continues from), so its log-probs of a dataset never change while training. TRL recomputes
them every step (a third of the step's compute) or, with `precompute_ref_log_probs`, once per
trainer. Here they are computed once per key and reused across epochs, reruns and every
method of an arena that trains on the same pairs.

The key hashes: the base model (its config, the weight files' names, sizes and mtimes when it
is a local folder, and a digest of its in-memory parameters), the reference adapter's parameters (or "none"), the
model dtype and mixed precision, the tokenizer (name and size), `max_length`, and the truncated token ids of
every pair in order (so the chat template, data and truncation are all in it). Anything that
changes a number changes the key; the file is then simply not found.

Files: `<root>/<key>.npz` (chosen, rejected float64 arrays) written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def default_root() -> Path:
    from pipeline.paths import cache_dir

    return cache_dir() / "ref_logps"


def _hash_tensors(named: Iterable[tuple[str, Any]]) -> str:
    import torch

    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _digest_parameters(named: Iterable[tuple[str, Any]]) -> str:
    """A cheap fingerprint of in-memory weights: per tensor its name, dtype, shape, float64 sum,
    L2 norm and first values. Catches a base changed after loading (e.g. an adapter merged in)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach()
        t = t if t.is_floating_point() else t.to(torch.float64)
        stats = [float(t.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(t, dtype=torch.float64))]
        head = t.flatten()[:8].to("cpu", torch.float64).tolist()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{stats!r}|{head!r}".encode())
    return h.hexdigest()


def base_model_identity(model) -> str:
    """The base weights' identity: config, dtype, weight files (path, size, mtime) of a local
    checkpoint folder, and a digest of the in-memory base parameters (LoRA excluded)."""
    from .logps import unwrap_peft

    base = unwrap_peft(model)
    config = base.config
    h = hashlib.sha256(config.to_json_string(use_diff=False).encode())
    h.update(str(base.dtype).encode())
    folder = Path(str(getattr(config, "_name_or_path", "") or ""))
    for p in sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(_digest_parameters((n, p) for n, p in base.named_parameters() if "lora_" not in n).encode())
    return h.hexdigest()


def reference_adapter_identity(model, adapter_name: str | None) -> str:
    """'none' when the reference is the base (adapter disabled), else the adapter's parameter hash."""
    if adapter_name is None:
        return "none"
    return _hash_tensors((n, p) for n, p in model.named_parameters() if f".{adapter_name}." in n)


def data_fingerprint(units) -> str:
    """Hash of the truncated (prompt, chosen, rejected) token ids of every pair, in order."""
    h = hashlib.sha256()
    for u in units:
        h.update(json.dumps([u.prompt, u.chosen, u.rejected]).encode())
    return h.hexdigest()


def cache_key(*, base: str, adapter: str, data: str, max_length: int | None, tokenizer: str, precision: str = "no") -> str:
    parts = {
        "base": base,
        "adapter": adapter,
        "data": data,
        "max_length": max_length,
        "tokenizer": tokenizer,
        "precision": precision,
        # 2: short attention pieces in bf16/fp16 on a CPU are computed as fp32 products (attention.py
        # `_small_piece`), for the policy and its reference alike: a reference cached by the SDPA route
        # would differ from the policy's own numbers at step 0 by bf16 rounding
        "v": 2,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class RefLogpCache:
    """A folder of `<key>.npz` files of reference log-probs (chosen, rejected per pair)."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def load(self, key: str, n_pairs: int) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        with np.load(path) as data:
            chosen, rejected = data["chosen"], data["rejected"]
        if chosen.shape != (n_pairs,) or rejected.shape != (n_pairs,):
            return None  # a torn or foreign file: recompute
        return chosen, rejected

    def save(self, key: str, chosen: np.ndarray, rejected: np.ndarray) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, chosen=np.asarray(chosen, dtype=np.float64), rejected=np.asarray(rejected, dtype=np.float64))
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path(key)
