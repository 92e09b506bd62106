"""Where heedful keeps caches and where shipped data lives."""

from __future__ import annotations

import os
from pathlib import Path


def heedful_home() -> Path:
    """Cache root (converted models, Argilla stack state). `HEEDFUL_HOME` overrides."""
    root = os.environ.get("HEEDFUL_HOME")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "heedful"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """The package's shipped data folder (`data/` in the repo, `heedful_data` when installed)."""
    import heedful_data

    return Path(heedful_data.__file__).resolve().parent


def resolve_data_ref(ref: str) -> Path:
    """`data:quickstart/prompts.jsonl` -> absolute path of a shipped data file."""
    assert ref.startswith("data:")
    return data_dir() / ref[len("data:") :]
