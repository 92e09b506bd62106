"""A wheel built from the checkout holds every module and every shipped data file. Until 2026-12-07
pyproject.toml listed the top-level packages only, and setuptools left their subpackages
(pipeline.evaluation, trainers.ppo, feedback.simulator, ...) out of the wheel: `pip install .` gave a
heedful whose report, arena and PPO failed to import. Editable installs (`make setup`) map whole
folders, so nothing else in the suite would notice."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from .conftest import ROOT

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

#: every package and subpackage pyproject.toml names (heedful_data is the `data` folder, checked by DATA)
LISTED = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]) - {"heedful_data"}
PACKAGES = sorted({name.split(".")[0] for name in LISTED})
DATA = ("*.jsonl", "*.json", "*.tsv", "*.txt", "*.md", "*.yaml")  # [tool.setuptools.package-data] heedful_data


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    # built from a copy: setuptools builds in ./build and would add what an earlier build left there
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (*PACKAGES, "data"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = tmp_path.glob("heedful-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert len(modules) > 150 and {"pipeline/evaluation/summary.py", "trainers/ppo/trainer.py"} <= modules
    assert sorted(modules - shipped) == []
    data = {
        "heedful_data/" + path.relative_to(ROOT / "data").as_posix()
        for pattern in DATA
        for path in (ROOT / "data").rglob(pattern)
    }
    assert data and sorted(data - shipped) == []


def test_every_package_is_named_in_pyproject_and_in_the_report_digest():
    """A new package goes into pyproject's list (or the wheel lacks it) and, unless it is ray_jobs'
    job scripts, into the report's source digest (or plots drawn by its code are reused after an edit)."""
    from pipeline.report import PLOTTING_PACKAGES

    tops = [p for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name not in {"tests", "data"}]
    found = {
        init.parent.relative_to(ROOT).as_posix().replace("/", ".")
        for top in tops
        for init in top.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert "trainers.ppo" in found and sorted(found ^ LISTED) == []
    assert sorted(set(PLOTTING_PACKAGES) ^ (set(PACKAGES) - {"ray_jobs"})) == []
