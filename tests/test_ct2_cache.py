"""The CTranslate2 conversion cache stays within its budget: least recently used out first,
orphans (their adapter deleted) out whatever the budget, and never a conversion that another
process has loaded or is building."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ctranslate2")

from pipeline.ct2_cache import budget_bytes, entries, evict  # noqa: E402
from pipeline.ct2_engine import Ct2Generator, converted_model  # noqa: E402
from pipeline.generation import SamplingSettings  # noqa: E402

from .conftest import isolated_home  # noqa: E402


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_model_path):
    """A home of its own: the test may empty its cache."""
    home = isolated_home(tmp_path / "home")
    monkeypatch.setenv("HEEDFUL_HOME", str(home))
    monkeypatch.delenv("HEEDFUL_CT2_CACHE_GB", raising=False)
    return home


def adapter_copies(lora_adapter, tmp_path, n):
    """`n` adapters at their own paths (a conversion is keyed by the adapter's path)."""
    return [shutil.copytree(lora_adapter, tmp_path / f"adapter{i}") for i in range(n)]


def cached(home):
    return {e.folder for e in entries(home / "ct2")}


def test_least_recently_used_goes_when_over_budget(home, tmp_path, lora_adapter, monkeypatch):
    first, second = adapter_copies(lora_adapter, tmp_path, 2)
    base = converted_model("tiny")
    old = converted_model("tiny", first)
    size = max(e.size for e in entries(home / "ct2"))
    base.release(), old.release()
    converted_model("tiny").release()  # the base used again: `first` is now the least recently used
    monkeypatch.setenv("HEEDFUL_CT2_CACHE_GB", str(2.5 * size / 1e9))
    new = converted_model("tiny", second)
    assert cached(home) == {base.folder, new.folder}
    new.release()
    assert budget_bytes() == int(2.5 * size)


def test_a_conversion_in_use_by_another_process_or_a_generator_stays(home, tmp_path, lora_adapter):
    (other,) = adapter_copies(lora_adapter, tmp_path, 1)
    held_elsewhere = converted_model("tiny")
    held_elsewhere.release()
    engine = Ct2Generator("tiny", adapter=other, threads=1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                from pathlib import Path
                from pipeline.ct2_cache import InUse
                held = InUse(Path({str(held_elsewhere.folder)!r}))
                print("held", flush=True)
                sys.stdin.readline()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert evict(home / "ct2", budget=0) == []  # both in use: nothing goes, over budget or not
    finally:
        holder.communicate("\n", timeout=30)
    assert evict(home / "ct2", budget=0) == [held_elsewhere.folder]
    # the generator reloads its weights from the folder for a seeded call: still there
    sampled = engine.generate([[{"role": "user", "content": "hi"}]], SamplingSettings(max_new_tokens=4), seed=1)
    assert sampled[0][0].num_tokens > 0
    engine.conversion.release()
    assert evict(home / "ct2", budget=0) == [engine.model_dir]
    assert cached(home) == set()


def test_orphans_go_whatever_the_budget_and_builds_under_way_are_left(home, tmp_path, lora_adapter):
    from filelock import FileLock

    gone, building = adapter_copies(lora_adapter, tmp_path, 2)
    orphan = converted_model("tiny", gone)
    being_built = converted_model("tiny", building)
    orphan.release(), being_built.release()
    staging = home / "ct2" / "0123abcd.tmp"  # a build's staging folder is not a conversion
    shutil.copytree(orphan.folder, staging)
    shutil.rmtree(gone)
    assert evict(home / "ct2", budget=10**12) == [orphan.folder]
    with FileLock(str(being_built.folder) + ".lock"):
        assert evict(home / "ct2", budget=0) == []
    assert staging.is_dir()
    assert evict(home / "ct2", budget=0) == [being_built.folder]


def test_a_bad_budget_is_named(monkeypatch):
    monkeypatch.setenv("HEEDFUL_CT2_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="HEEDFUL_CT2_CACHE_GB"):
        budget_bytes()
    for bad in ("-1", "inf", "nan"):
        monkeypatch.setenv("HEEDFUL_CT2_CACHE_GB", bad)
        with pytest.raises(ValueError, match="finite number of GB >= 0"):
            budget_bytes()


def test_the_cli_shows_and_prunes_the_cache(home):
    from typer.testing import CliRunner

    from pipeline.cli import app

    converted_model("tiny").release()
    shown = CliRunner().invoke(app, ["models", "conversions"])
    assert shown.exit_code == 0 and "1 conversion(s)" in shown.output and "0 orphaned" in shown.output
    negative = CliRunner().invoke(app, ["models", "conversions", "--prune", "--budget-gb", "-1"])
    message = " ".join(negative.output.replace("│", " ").split())  # typer's box wraps the message
    assert negative.exit_code == 2 and "--budget-gb must be a finite number" in message and cached(home)
    pruned = CliRunner().invoke(app, ["models", "conversions", "--prune", "--budget-gb", "0"])
    assert pruned.exit_code == 0 and "removed 1 conversion(s)" in pruned.output and cached(home) == set()
