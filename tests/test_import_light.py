"""Stage modules import light (heavy libraries load inside `run()`), and a broken stage
module is reported by name while the scan carries on.

Each check runs in a fresh interpreter so that nothing imported by other tests hides an
import-time dependency.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import stages

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "peft", "datasets")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ImportError(f"{{name}} is blocked: stage modules must import it inside run()")
            return None

    sys.meta_path.insert(0, Block())
""")


def run_python(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env_path = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(env_path)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_every_stage_module_imports_without_heavy_libraries():
    modules = sorted(info.name for info in pkgutil.iter_modules(stages.__path__) if not info.name.startswith("_"))
    assert {"dpo", "kto", "c3po", "cut", "coh", "ppo"} <= set(modules)
    code = BLOCKER + textwrap.dedent(f"""
        import importlib, json
        from pipeline import registry
        from pipeline.stage import Stage
        failures, uses = {{}}, {{}}
        for name in {modules!r}:
            try:
                module = importlib.import_module("stages." + name)
            except Exception as exc:
                failures[name] = repr(exc)
                continue
            uses[name] = [o.uses for o in vars(module).values()
                          if isinstance(o, type) and issubclass(o, Stage) and o.__module__ == module.__name__ and o.uses]
        print(json.dumps({{"failures": failures, "uses": uses, "registered": registry.names(),
                          "broken": registry.broken(), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failures"] == {}, report["failures"]
    assert report["broken"] == {}
    assert report["heavy"] == []
    declared = {u for names in report["uses"].values() for u in names}
    assert {"dpo", "kto", "c3po", "cut", "coh", "ppo", "c3po_data"} <= declared
    assert declared <= set(report["registered"])


def test_a_broken_third_party_stage_is_named_and_the_scan_carries_on(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('plugin exploded at import')\n")
    (tmp_path / "good_plugin.py").write_text(
        textwrap.dedent("""
        from pipeline.stage import Stage

        class GoodStage(Stage):
            uses = "good_plugin_stage"
    """)
    )
    dist = tmp_path / "heedful_test_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: heedful-test-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[heedful.stages]\nbroken = broken_plugin:BrokenStage\ngood = good_plugin:GoodStage\n")
    # and a broken module inside the scanned `stages` package itself
    extra_stages = tmp_path / "extra_stages"
    extra_stages.mkdir()
    (extra_stages / "exploding.py").write_text("import no_such_library_anywhere\n")
    code = textwrap.dedent(f"""
        import json, warnings
        import stages
        stages.__path__.append({str(extra_stages)!r})
        from pipeline import registry
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = registry.names()
        print(json.dumps({{"names": names, "broken": registry.broken(), "warnings": [str(w.message) for w in caught]}}))
    """)
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"dpo", "kto", "good_plugin_stage"} <= set(report["names"])
    broken = report["broken"]
    assert set(broken) == {"stages.exploding", "broken_plugin:BrokenStage (entry point 'broken')"}, broken
    assert "plugin exploded at import" in broken["broken_plugin:BrokenStage (entry point 'broken')"]
    assert "no_such_library_anywhere" in broken["stages.exploding"]
    assert any("stages.exploding" in w for w in report["warnings"])

    cli = run_python(
        textwrap.dedent(f"""
        import sys
        import stages
        stages.__path__.append({str(extra_stages)!r})
        from pipeline.cli import app
        sys.argv = ["heedful", "stages"]
        app()
    """),
        tmp_path,
    )
    assert "not loaded: stages.exploding" in cli.stdout and "plugin exploded at import" in cli.stdout, cli.stdout[-2000:]
    assert "good_plugin_stage" in cli.stdout
