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

A **canary** is a candidate loaded the same way but served only to a share of users: a
user is in the canary when `canary_bucket(salt, user)` (SHA-256 of a per-server salt and the
user's id, read as a number in [0, 1)) is below the share. The same user therefore gets the
same version on every request, a larger share keeps everyone a smaller one had, and nobody
can pick a side by guessing (the salt is secret). Promote makes the canary the active
version for everyone; rollback while a canary runs drops it (the active version never
changed). While a canary runs, any other deploy is refused (409): the experiment is
decided first, not silently replaced.
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


class VersionConflict(ValueError):
    """The act does not fit the current state (promote without a canary, deploy while one runs); nothing changed."""


def canary_bucket(salt: str, user: str) -> float:
    """The user's fixed place in [0, 1): SHA-256 of salt + user id; in the canary when below the share."""
    digest = hashlib.sha256(f"{salt}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def canonical_config(raw: bytes) -> bytes:
    """adapter_config.json as canonical JSON (sorted keys, lists of names sorted): PEFT writes
    `target_modules` (a set) in a different order from run to run, which must not change the id."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw  # not JSON: hash it as it is (check_adapter_folder refuses it anyway)

    def canon(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: canon(v) for k, v in value.items()}
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return sorted(value)
        return [canon(v) for v in value] if isinstance(value, list) else value

    return json.dumps(canon(data), sort_keys=True, separators=(",", ":")).encode()


def adapter_version_id(adapter: str | Path | None) -> str:
    """`adp-` + 12 hex digits of SHA-256 over the canonical config and the weight files, and a
    Chain-of-Hindsight adapter's phrase (it changes what the version answers); `base` for None."""
    if adapter is None:
        return "base"
    from pipeline.hindsight import COH_FILE, adapter_phrase

    folder = Path(adapter)
    digest = hashlib.sha256()
    try:
        phrase = adapter_phrase(folder)
    except ValueError:  # a bad coh.json still names a version (its bytes); loading it is what refuses it
        digest.update(COH_FILE.encode() + (folder / COH_FILE).read_bytes())
    else:
        if phrase is not None:
            digest.update(COH_FILE.encode() + json.dumps([phrase.text, sorted(phrase.stop)]).encode())
    for name in ("adapter_config.json", *WEIGHT_FILES):
        path = folder / name
        if not path.is_file():
            continue
        digest.update(name.encode())
        if name == "adapter_config.json":
            digest.update(canonical_config(path.read_bytes()))
            continue
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
    from pipeline.hindsight import adapter_phrase

    try:
        adapter_phrase(folder)  # a Chain-of-Hindsight adapter's coh.json, read as serving reads it
    except ValueError as exc:
        raise AdapterRefused(str(exc)) from None
    return folder.resolve()


@dataclass
class Version:
    id: str
    adapter: str | None
    loaded_at: float
    engine: Any = field(repr=False, default=None)
    in_use: int = 0
    retired: bool = False  # no longer kept loaded: close the engine once in_use drops to 0

    def public(self, active: bool, canary: float = 0.0) -> dict[str, Any]:
        """`canary`: the share of users this version serves as a canary (0 when it is none)."""
        return {
            "id": self.id,
            "adapter": self.adapter,
            "loaded_at": self.loaded_at,
            "active": active,
            "loaded": self.engine is not None,
            "canary": canary,
        }


class AdapterVersions:
    """The served versions; `factory(adapter_path_or_None)` builds an engine (base + adapter).

    `salt` keys the canary buckets (keep it secret and fixed per server: the store's meta table).
    """

    def __init__(self, factory: Callable[[str | None], Any], adapter: str | None, engine: Any = None, salt: str = ""):
        self._factory = factory
        self._salt = salt
        self._lock = threading.Lock()  # guards the reference swap and the bookkeeping, never a model load
        self._deploy_lock = threading.Lock()  # one deploy, promote or rollback at a time
        first = Version(adapter_version_id(adapter), adapter, time.time(), engine if engine is not None else factory(adapter))
        self._history: list[Version] = [first]  # in order of activation; the last is active
        self._canary: Version | None = None
        self._share = 0.0

    @property
    def active(self) -> Version:
        return self._history[-1]

    @property
    def canary(self) -> tuple[Version, float] | None:
        """(the canary version, its share of users), or None."""
        with self._lock:
            return None if self._canary is None else (self._canary, self._share)

    def in_canary(self, user: str | None) -> bool:
        """Whether `user` is served by the canary while one runs (None, an unknown caller: never)."""
        return self._canary is not None and user is not None and canary_bucket(self._salt, user) < self._share

    @contextmanager
    def acquire(self, user: str | None = None) -> Iterator[Version]:
        """The version serving `user` (the canary for its share of users, else the active one), held
        (not closed) until the block ends."""
        with self._lock:
            version = self._canary if self._canary is not None and self.in_canary(user) else self.active
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
        """Every version once, newest first: the canary (if any), then in reverse order of activation."""
        with self._lock:
            active = self.active
            seen, rows = set(), []
            if self._canary is not None:
                seen.add(self._canary.id)
                rows.append(self._canary.public(False, self._share))
            for version in reversed(self._history):
                if version.id not in seen:
                    seen.add(version.id)
                    rows.append(version.public(version is active))
            return rows

    def deploy(self, adapter: str | Path, canary: float | None = None) -> Version:
        """Load `adapter` off to the side, then switch to it (or, with `canary`, serve it to that share
        of users beside the active version); on any failure nothing changes.

        While a canary runs: the same adapter again changes its share (with `canary`) or promotes it
        (without); any other adapter is refused until the canary is promoted or dropped.
        """
        if canary is not None and not 0 < canary < 1:
            raise VersionConflict(f"canary share must be between 0 and 1 (exclusive), got {canary}")
        folder = check_adapter_folder(adapter)
        with self._deploy_lock:
            vid = adapter_version_id(folder)
            if self._canary is not None:
                return self._again_while_canary(self._canary, vid, canary)
            if vid == self.active.id:
                if canary is not None:
                    raise VersionConflict(f"{folder} is the active version ({vid}) already; nothing to try as a canary")
                return self.active
            with self._lock:
                loaded = next((v for v in self._history[:-1] if v.id == vid and v.engine is not None), None)
            if loaded is not None and canary is None:  # e.g. deployed again after a rollback: still loaded
                return self._reactivate(loaded)
            try:
                engine = self._factory(str(folder))
            except Exception as exc:  # noqa: BLE001 - whatever PEFT/torch raise, the answer is: refused
                raise AdapterRefused(
                    f"{folder}: the adapter could not be loaded on this server's base model ({type(exc).__name__}: {exc})"
                ) from None
            version = Version(vid, str(folder), time.time(), engine)
            if canary is None:
                return self._activate(version)
            with self._lock:
                self._canary, self._share = version, canary
            return version

    def _again_while_canary(self, running: Version, vid: str, canary: float | None) -> Version:
        if vid != running.id:
            raise VersionConflict(
                f"canary {running.id} runs for {self._share:.0%} of users; promote it "
                "(POST /v1/admin/adapters/promote) or drop it (POST /v1/admin/adapters/rollback) "
                "before deploying another version"
            )
        if canary is None:
            return self._promote()
        with self._lock:
            self._share = canary
        return running

    def promote(self) -> Version:
        """Make the canary the active version for every user (the active one stays loaded for a rollback)."""
        with self._deploy_lock:
            return self._promote()

    def _promote(self) -> Version:
        with self._lock:
            version, self._canary, self._share = self._canary, None, 0.0
        if version is None:
            raise VersionConflict("no canary is running; nothing to promote (deploy one with a canary share first)")
        return self._activate(version)

    def rollback(self) -> Version:
        """Drop the canary if one runs (the active version stays); otherwise switch back to the version
        active before this one (loaded again if it had been closed). Returns the active version."""
        with self._deploy_lock:
            with self._lock:
                dropped, self._canary, self._share = self._canary, None, 0.0
                engine = _retire(dropped) if dropped is not None else None
            if dropped is None:
                return self._switch_back()
            _close(engine)
            return self.active

    def _switch_back(self) -> Version:
        with self._lock:
            current = self.active
            previous = next((v for v in reversed(self._history[:-1]) if v.id != current.id), None)
        if previous is None:
            raise VersionConflict("no previous version to roll back to")
        return self._reactivate(previous)

    def _reactivate(self, version: Version) -> Version:
        """Make an earlier version active again: its engine if still loaded, else loaded anew."""
        with self._lock:
            engine = version.engine
            version.retired = False  # still loaded: keep it so
        if engine is None:
            try:
                engine = self._factory(version.adapter)
            except Exception as exc:  # noqa: BLE001
                raise AdapterRefused(
                    f"version {version.id} ({version.adapter}) could not be loaded again ({type(exc).__name__}: {exc})"
                ) from None
            version.loaded_at = time.time()
        with self._lock:
            version.engine = engine
            self._history.remove(version)  # moved to the end: a rollback returns to the one before
        return self._activate(version)

    def _activate(self, version: Version) -> Version:
        to_close = []
        with self._lock:
            self._history.append(version)
            keep = self._history[-2:]
            for old in self._history:
                if not any(old is k for k in keep) and old.engine is not None:
                    to_close.append(_retire(old))
        for engine in to_close:
            _close(engine)
        return version

    def close(self, keep: Any = None) -> None:
        """Close every loaded engine except `keep` (one the caller owns)."""
        with self._lock:
            every = self._history + ([self._canary] if self._canary is not None else [])
            engines = {id(v.engine): v.engine for v in every if v.engine is not None and v.engine is not keep}
            for v in every:
                v.engine = None
        for engine in engines.values():
            _close(engine)


def _retire(version: Version) -> Any:
    """Mark `version` as no longer kept loaded; its engine when nobody uses it now (the caller closes
    it outside the lock), else None (the last `acquire` to release it closes it)."""
    version.retired = True
    if version.in_use or version.engine is None:
        return None
    engine, version.engine = version.engine, None
    return engine


def _close(engine: Any) -> None:
    if engine is not None and hasattr(engine, "close"):
        engine.close()
