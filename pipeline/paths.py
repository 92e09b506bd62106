"""Where heedful keeps caches and where shipped data lives, and how a path written in a
pipeline config is read: against the config file's folder (`config_relative`, `ConfigPath`)."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator

if TYPE_CHECKING:
    from pydantic import ValidationInfo


def heedful_home() -> Path:
    """Cache root (converted models, Argilla stack state). `HEEDFUL_HOME` overrides."""
    root = os.environ.get("HEEDFUL_HOME")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "heedful"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """`<heedful home>/cache`: the one folder for what heedful remembers between runs and may lose
    at any time (the simulator's LLM call cache, folder hashes, the precision/engine/checkpointing
    probes' answers, reference log-probs). One function, so every writer and reader agrees on it
    and a `HEEDFUL_HOME` override (tests' isolated homes) moves all of them together. Not created
    here: each user makes the subfolder or file it writes."""
    return heedful_home() / "cache"


def data_dir() -> Path:
    """The package's shipped data folder (`data/` in the repo, `heedful_data` when installed)."""
    import heedful_data

    return Path(heedful_data.__file__).resolve().parent


def resolve_data_ref(ref: str) -> Path:
    """`data:quickstart/prompts.jsonl` -> absolute path of a shipped data file."""
    assert ref.startswith("data:")
    return data_dir() / ref[len("data:") :]


#: the validation context key under which `pipeline.config` gives a stage config its config file's folder
CONFIG_DIR = "config_dir"


def config_relative(value: str, base_dir: Path) -> str:
    """A path written in a config file as the absolute path it names: `~` expanded, a relative
    path against the config file's folder `base_dir` (never the working directory), an absolute
    one exactly as written (so its fingerprint is the one it had). The one rule for every path a
    pipeline config names: its inputs, its `model:`, and each file or folder a stage's `with:`
    names (`ConfigPath`, `models.config_model`)."""
    if Path(value).is_absolute():
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def config_dir(info: ValidationInfo) -> Path | None:
    """The folder of the config file being validated (`CONFIG_DIR` in the validation context);
    None without one (the executor re-reading a config already resolved, settings built in code
    or from the command line, which keep their own meaning)."""
    base_dir = (info.context or {}).get(CONFIG_DIR)
    return None if base_dir is None else Path(base_dir)


def _relative_to_config(value: str, info: ValidationInfo) -> str:
    """`ConfigPath`'s validator: `config_relative` when a config file's folder is known. A `data:`
    reference (a shipped file) and a URL (`s3://...`) are left as written."""
    base_dir = config_dir(info)
    if base_dir is None or not value or value.startswith("data:") or "://" in value:
        return value
    return config_relative(value, base_dir)


#: a file or folder named in a stage's `with:` (an adapter, a key file, a cache the stage writes ...):
#: relative to the pipeline config's folder, as its inputs and its `model:` are. A field typed so
#: needs nothing else: `pipeline.config` validates each stage's `with:` with the folder in context.
ConfigPath = Annotated[str, AfterValidator(_relative_to_config)]


def config_path_keys(mapping: dict[str, Any], keys: Collection[str], info: ValidationInfo) -> dict[str, Any]:
    """A free-form mapping of a stage's `with:` (`trainer_args`) with the string values of its
    path-valued `keys` read as a `ConfigPath` is: beside the config file. Any other value (a dict,
    an inline JSON string `'{...}'`, which transformers parses itself) stays as written."""
    return {
        key: _relative_to_config(value, info)
        if key in keys and isinstance(value, str) and not value.lstrip().startswith("{")
        else value
        for key, value in mapping.items()
    }
