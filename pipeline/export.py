"""Package an adapter for shipping: PEFT files + model card + `heedful.json` lineage (+ merged model).

heedful.json also records the package's version id (`version_id`: the content-addressed id a
server reports for every completion this folder writes, `serving.versions.adapter_version_id`)
and the id of the run's adapter it was copied from (`source_version_id`; they differ when the
export points the config at the hub's base model). So a completion's version leads back to
this export, its run and the feedback records that shaped it (`heedful trace`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .artifacts import atomic_write_json
from .hindsight import Phrase, adapter_phrase
from .lineage import build_lineage

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def export_adapter(
    adapter: Path,
    dest: Path,
    *,
    merge: bool = False,
    name: str | None = None,
    description: str = "",
    license: str = "apache-2.0",
    lineage: dict[str, Any] | None = None,
) -> Path:
    """Write the export package to `dest` atomically (temp folder, then rename)."""
    adapter, dest = Path(adapter), Path(dest)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: not a PEFT adapter folder (adapter_config.json missing)")
    lineage = lineage or build_lineage(adapter)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in adapter.iterdir():
        if _shippable(item):
            shutil.copy2(item, tmp / item.name)
    base = lineage.get("base_model") or {}
    _portable_base(tmp / "adapter_config.json", base)
    lineage = {**lineage, **version_ids(tmp, adapter)}
    atomic_write_json(tmp / "heedful.json", lineage)
    card = model_card(lineage, name or adapter.parent.name, description, license, adapter_phrase(adapter))
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if merge:
        _write_merged(adapter, tmp / "merged", base)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def version_ids(package: Path, adapter: Path) -> dict[str, str]:
    """The served version id of the package and of the run's adapter it came from."""
    from serving.versions import adapter_version_id

    return {"version_id": adapter_version_id(package), "source_version_id": adapter_version_id(adapter)}


def _shippable(item: Path) -> bool:
    """Adapter, tokenizer and template files; not pickles such as training_args.bin."""
    if not item.is_file() or item.name.startswith("."):
        return False
    return item.name in PEFT_FILES or item.suffix not in (".bin", ".pt", ".pkl")


def _portable_base(config_path: Path, base: dict[str, Any]) -> None:
    """Point the adapter at the public hub id instead of this machine's cache folder."""
    config = json.loads(config_path.read_text())
    if base.get("hub_id"):
        config["base_model_name_or_path"] = base["hub_id"]
        atomic_write_json(config_path, config)


def _write_merged(adapter: Path, out: Path, base: dict[str, Any]) -> None:
    from .models import device_policy, load_causal_lm, load_tokenizer

    name = base.get("name")
    if not name:
        raise ValueError("cannot merge: the adapter's base model is unknown (no lineage)")
    # merged in fp32 on any CPU (a GPU keeps its dtype): bf16 would round away much of a small LoRA change
    model = load_causal_lm(name, device_policy(precision="float32"), adapter=adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    load_tokenizer(name).save_pretrained(out)


def model_card(lineage: dict[str, Any], name: str, description: str, license: str, phrase: Phrase | None = None) -> str:
    """The package's README.md; a Chain-of-Hindsight adapter's says how to prompt it (its `phrase`)."""
    base = lineage.get("base_model") or {}
    hub = base.get("hub_id") or base.get("name") or "unknown"
    methods = sorted({s["uses"] for s in lineage.get("stages", [])})
    lines = [
        "---",
        f"base_model: {hub}",
        "library_name: peft",
        f"license: {license}",
        "tags:",
        "- heedful",
        *[f"- {m}" for m in methods],
        "---",
        "",
        f"# {name}",
        "",
        description or f"A LoRA adapter for {hub}, aligned from feedback with heedful.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from peft import PeftModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{hub}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
        *_phrase_use(phrase),
        "## Base weights",
        "",
        f"- {base.get('weights', 'unknown')}",
        "",
        "## How it was made",
        "",
        "| stage | method | key metrics |",
        "|---|---|---|",
    ]
    for stage in lineage.get("stages", []):
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in list(stage.get("metrics", {}).items())[:5])
        lines.append(f"| {stage['name']} | {stage['uses']} | {metrics} |")
    lines += ["", *feedback_section(lineage)]
    lines += ["", f"Run `{lineage.get('run_name')}`; full lineage in `heedful.json`.", ""]
    return "\n".join(lines)


def _phrase_use(phrase: Phrase | None) -> list[str]:
    """How a Chain-of-Hindsight adapter is prompted: it was trained to answer after its phrase."""
    if phrase is None:
        return []
    stops = ", ".join(f"`{s}`" for s in phrase.stop) or "(none)"
    return [
        f"This is a Chain-of-Hindsight adapter: it answers after the phrase `{phrase.text}`. Append the phrase to",
        "the prompt rendered with the chat template (assistant turn open), and cut the reply where one of",
        f"these begins: {stops}. Both are in `coh.json`; `heedful serve` applies them.",
        "",
    ]


def feedback_section(lineage: dict[str, Any]) -> list[str]:
    """Counts per kind and where they came from; the ids stay in heedful.json (there may be 10k)."""
    version = lineage.get("version_id")
    lines = ["## Feedback that shaped this adapter", ""]
    if version:
        lines += [f"Version id `{version}` (what `heedful serve` reports for each completion it writes).", ""]
    counts = lineage.get("feedback_record_counts") or {}
    if not counts:
        return [*lines, "No feedback records upstream of this adapter."]
    sources = lineage.get("feedback_sources", [])
    lines += ["| kind | records | from |", "|---|---|---|"]
    lines += [f"| {kind} | {n} | {', '.join(_origins(sources, kind))} |" for kind, n in counts.items()]
    notes = [
        f"- includes the records of the adapter it continued, `{s['inherited_from']}`" for s in sources if s.get("inherited_from")
    ]
    notes += [f"- could not read `{s.get('path') or s.get('inherited_from')}`: {s['error']}" for s in sources if s.get("error")]
    lines += ["", *notes] if notes else []
    trace = f"`heedful trace --version {version}`" if version else "`heedful trace`"
    lines += [
        "",
        f"Every record (id, kind, time given, source stage) is in `feedback_records` in `heedful.json`; {trace} shows them.",
    ]
    return lines


def _origins(sources: list[dict[str, Any]], kind: str) -> list[str]:
    """Where the records of `kind` came from: stages, files given directly, adapters continued."""
    out = []
    for source in sources:
        if (source.get("counts") or {}).get(kind):
            if source.get("inherited_from"):
                out.append(f"run {source.get('run') or '?'} (inherited)")
            else:
                out.append(source.get("source_stage") or Path(str(source.get("path"))).name)
    return sorted(set(out))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
