"""Adapter versions of a running server: load a new one beside the old, switch, roll back; never a restart.

Why this shape: a deploy must not stop the server, and a broken adapter must never
replace a working one. So a new version is loaded completely *off to the side* (its own
engine: base + adapter), and only once it has loaded does a lock-guarded reference swap
make it the active one. A request takes the active (version, engine) pair once, when it
starts, and keeps it to the end (`acquire`), so every reply is written by exactly one
version and says which. The version that was active before stays loaded, so a rollback is
the same instant swap; an older one is closed once its last request has finished.

A version's id is content-addressed (`adp-` + the first 12 hex digits of the SHA-256 of
the adapter's config and weight files; `base` without an adapter): the same folder gives
the same id on every server and after restarts, so a completion's version leads back to
the exact adapter files (and, through the export's heedful.json, to the run).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterRefused(ValueError):
    """The folder cannot become a version (not a PEFT adapter, unreadable, failed to load); nothing changed."""


def adapter_version_id(adapter: str | Path | None) -> str:
    if adapter is None:
        return "base"
    folder = Path(adapter)
    digest = hashlib.sha256()
    for name in ("adapter_config.json", *WEIGHT_FILES):
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return "adp-" + digest.hexdigest()[:12]


def check_adapter_folder(adapter: str | Path) -> Path:
    """A clear refusal for what is visibly not a loadable PEFT folder, before any weights are read."""
    folder = Path(adapter).expanduser()
    if not folder.is_absolute():
        raise AdapterRefused(f"adapter path '{adapter}' must be absolute (a folder on the server's machine)")
    if not folder.is_dir():
        raise AdapterRefused(f"adapter folder {folder} does not exist on the server (or is not a folder)")
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise AdapterRefused(f"{folder}: no adapter_config.json (expected a PEFT adapter folder, e.g. an export)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterRefused(f"{config}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise AdapterRefused(f"{config}: field 'peft_type' missing (not a PEFT adapter config)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise AdapterRefused(f"{folder}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
    return folder.resolve()


@dataclass
class Version:
    id: str
    adapter: str | None
    loaded_at: float
    engine: Any = field(repr=False, default=None)
    in_use: int = 0
    retired: bool = False  # no longer kept loaded: close the engine once in_use drops to 0

    def public(self, active: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "adapter": self.adapter,
            "loaded_at": self.loaded_at,
            "active": active,
            "loaded": self.engine is not None,
        }


class AdapterVersions:
    """The served versions; `factory(adapter_path_or_None)` builds an engine (base + adapter)."""

    def __init__(self, factory: Callable[[str | None], Any], adapter: str | None, engine: Any = None):
        self._factory = factory
        self._lock = threading.Lock()  # guards the reference swap and the bookkeeping, never a model load
        self._deploy_lock = threading.Lock()  # one deploy or rollback at a time
        first = Version(adapter_version_id(adapter), adapter, time.time(), engine if engine is not None else factory(adapter))
        self._history: list[Version] = [first]  # in order of activation; the last is active

    @property
    def active(self) -> Version:
        return self._history[-1]

    @contextmanager
    def acquire(self) -> Iterator[Version]:
        """The active version, held (not closed) until the block ends."""
        with self._lock:
            version = self.active
            version.in_use += 1
        try:
            yield version
        finally:
            with self._lock:
                version.in_use -= 1
                close = version.retired and version.in_use == 0 and version.engine is not None
                engine = version.engine if close else None
                if close:
                    version.engine = None
            _close(engine)

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            active = self.active
            seen, rows = set(), []
            for version in reversed(self._history):
                if version.id not in seen:
                    seen.add(version.id)
                    rows.append(version.public(version is active))
            return rows

    def deploy(self, adapter: str | Path) -> Version:
        """Load `adapter` off to the side and switch to it; on any failure the active version stays."""
        folder = check_adapter_folder(adapter)
        with self._deploy_lock:
            vid = adapter_version_id(folder)
            if vid == self.active.id:
                return self.active
            try:
                engine = self._factory(str(folder))
            except Exception as exc:  # noqa: BLE001 - whatever PEFT/torch raise, the answer is: refused
                raise AdapterRefused(
                    f"{folder}: the adapter could not be loaded on this server's base model ({type(exc).__name__}: {exc})"
                ) from None
            return self._activate(Version(vid, str(folder), time.time(), engine))

    def rollback(self) -> Version:
        """Switch back to the version active before this one (loaded again if it had been closed)."""
        with self._deploy_lock:
            with self._lock:
                current = self.active
                previous = next((v for v in reversed(self._history[:-1]) if v.id != current.id), None)
                engine = previous.engine if previous is not None else None
                if previous is not None:
                    previous.retired = False  # still loaded: keep it so
            if previous is None:
                raise AdapterRefused("no previous version to roll back to")
            if engine is None:
                try:
                    engine = self._factory(previous.adapter)
                except Exception as exc:  # noqa: BLE001
                    raise AdapterRefused(
                        f"previous version {previous.id} ({previous.adapter}) could not be "
                        f"loaded again ({type(exc).__name__}: {exc})"
                    ) from None
                previous.loaded_at = time.time()
            with self._lock:
                previous.engine = engine
                self._history.remove(previous)  # moved to the end: a second rollback returns to `current`
            return self._activate(previous)

    def _activate(self, version: Version) -> Version:
        to_close = []
        with self._lock:
            self._history.append(version)
            keep = self._history[-2:]
            for old in self._history:
                if not any(old is k for k in keep) and old.engine is not None:
                    old.retired = True
                    if old.in_use == 0:
                        to_close.append(old.engine)
                        old.engine = None
        for engine in to_close:
            _close(engine)
        return version

    def close(self, keep: Any = None) -> None:
        """Close every loaded engine except `keep` (one the caller owns)."""
        with self._lock:
            engines = {id(v.engine): v.engine for v in self._history if v.engine is not None and v.engine is not keep}
            for v in self._history:
                v.engine = None
        for engine in engines.values():
            _close(engine)


def _close(engine: Any) -> None:
    if engine is not None and hasattr(engine, "close"):
        engine.close()
