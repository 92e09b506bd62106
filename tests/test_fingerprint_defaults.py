"""Guard: a stage config's DEFAULT may not change without a bump of the stage's `version`.

Fingerprints hash only non-default config fields (pipeline/fingerprint.py), so a changed
default would otherwise leave finished runs "up to date" although an unchanged config now
does something else. tests/fingerprint_defaults.json records every built-in stage's
version and every default its config reaches (nested models included). When this test
fails: bump `version` on the stage class if an existing default changed, then re-record with

    python -m tests.test_fingerprint_defaults

(the recorder refuses while a default changed under an unchanged version).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline import registry
from pipeline.fingerprint import default_paths

SNAPSHOT = Path(__file__).with_name("fingerprint_defaults.json")
RECORD = "python -m tests.test_fingerprint_defaults"


def _non_semantic(path: str, skip: frozenset[str]) -> bool:
    """Whether a default's path (`followup.fast`, `reward[Plove].x`) is, or lies under, a non-semantic
    field (top-level `fast`, or dotted into a nested model: `followup.fast`)."""
    plain = ".".join(part.split("[")[0] for part in path.split("."))
    return any(plain == s or plain.startswith(s + ".") for s in skip)


def current() -> dict[str, dict[str, Any]]:
    """uses -> {version, defaults} for every stage shipped in `stages/` (plugins are their own business)."""
    out: dict[str, dict[str, Any]] = {}
    for name in registry.names():
        cls = registry.get(name)
        assert cls is not None
        if not cls.__module__.startswith("stages."):
            continue
        skip = cls.non_semantic_fields
        defaults = {k: v for k, v in default_paths(cls.Config).items() if not _non_semantic(k, skip)}
        out[name] = {"version": cls.version, "defaults": defaults}
    return out


def unbumped_changes(recorded: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> list[str]:
    """`stage: path old -> new` for each existing default that changed while the version did not."""
    problems = []
    for name, entry in now.items():
        old = recorded.get(name)
        if old is None or old["version"] != entry["version"]:
            continue
        for path, value in entry["defaults"].items():
            if path in old["defaults"] and old["defaults"][path] != value:
                cls = registry.get(name)
                assert cls is not None
                problems.append(
                    f"{name}: default {path} changed {old['defaults'][path]!r} -> {value!r}; "
                    f"bump `version` of {cls.__module__}.{cls.__qualname__} (now {entry['version']!r})"
                )
    return problems


def test_no_default_changed_without_a_version_bump():
    problems = unbumped_changes(json.loads(SNAPSHOT.read_text()), current())
    assert not problems, "\n".join(problems)


def test_snapshot_is_up_to_date():
    recorded, now = json.loads(SNAPSHOT.read_text()), current()
    stale = sorted(name for name in set(recorded) | set(now) if recorded.get(name) != now.get(name))
    assert not stale, f"stage defaults/versions changed for {stale}: re-record with `{RECORD}`"


def test_guard_catches_a_changed_default_and_accepts_a_bump_or_a_new_field():
    now = current()
    recorded = json.loads(json.dumps(now))
    recorded["dpo"]["defaults"]["beta"] = 0.5  # as if the default had been 0.5 before
    assert any("dpo: default beta" in p for p in unbumped_changes(recorded, now))
    recorded["dpo"]["version"] = "0"  # the stage's version was bumped since
    assert not unbumped_changes(recorded, now)
    del recorded["dpo"]["defaults"]["rpo_alpha"]  # a field added since: not a changed default
    recorded["dpo"]["version"] = now["dpo"]["version"]
    recorded["dpo"]["defaults"]["beta"] = now["dpo"]["defaults"]["beta"]
    assert not unbumped_changes(recorded, now)
    recorded["dpo"]["defaults"]["lora.r"] = 99  # nested model defaults are guarded too
    assert any("lora.r" in p for p in unbumped_changes(recorded, now))


def record() -> int:
    now = current()
    recorded = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.is_file() else {}
    problems = unbumped_changes(recorded, now)
    if problems:
        print("refusing to record:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    SNAPSHOT.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(now)} stages -> {SNAPSHOT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(record())
