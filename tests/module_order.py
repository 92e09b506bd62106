"""Longest test modules first, so two xdist workers finish together.

`make test` runs the suite with `--dist loadscope` (a module's fixtures start once per worker) and
`--no-loadscope-reorder`, so modules are handed out in collection order. Collected alphabetically,
a few long modules (the quickstart under Ray, PPO on SmolLM2) could start last and leave the other
worker idle for minutes. This plugin sorts modules by their last measured duration, longest first
(longest-processing-time-first: within 4/3 of the best split for two workers).

Durations come from `.pytest_cache/heedful/module_times.json`, written at the end of every run
(the sum of each module's setup, call and teardown times as the controller saw them), else from
the checked-in `tests/module_times.json` (a clean checkout, as in CI). A module in neither counts
as `UNKNOWN_S`; among equal times, modules with more tests go first (xdist's own reorder). Test
order inside a module is unchanged.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

CHECKED_IN = Path(__file__).with_name("module_times.json")
UNKNOWN_S = 20.0
_measured: dict[str, float] = defaultdict(float)


def _cache_file(config: pytest.Config) -> Path:
    return Path(str(config.rootpath)) / ".pytest_cache" / "heedful" / "module_times.json"


def _known_times(config: pytest.Config) -> dict[str, float]:
    for path in (_cache_file(config), CHECKED_IN):
        try:
            return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            continue
    return {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    times = _known_times(config)
    first_seen: dict[str, int] = {}
    count: dict[str, int] = defaultdict(int)
    for i, item in enumerate(items):
        module = item.nodeid.split("::")[0]
        first_seen.setdefault(module, i)
        count[module] += 1

    def key(item: pytest.Item) -> tuple[float, int, int]:
        module = item.nodeid.split("::")[0]
        # unknown modules by test count, as xdist's own reorder did; a stable key gives every worker the same order
        return (-times.get(module, UNKNOWN_S), -count[module], first_seen[module])

    items.sort(key=key)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _measured[report.nodeid.split("::")[0]] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if hasattr(config, "workerinput") or not _measured:  # the controller (or a plain run) writes
        return
    if config.option.keyword or config.option.markexpr or any("::" in a for a in config.args):
        return  # a selection: its module totals would be partial
    path = _cache_file(config)
    known = _known_times(config)
    known.update({k: round(v, 1) for k, v in _measured.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
    tmp.replace(path)
