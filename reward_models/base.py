"""One protocol for every reward model: `score(batch) -> Rewards(scalar [B], dense [B, T] | None)`.

`dense[b, t]` is the reward at the policy's t-th *response* token of sample b (aligned to the
policy tokenizer, zero-padded to T = the longest response); fine-grained models fill it,
others leave it None. PPO, rejection sampling and Argilla suggestions all call `score`.
A trained reward model is a folder with `reward_model.json` ({"kind": ...}) that
`load_reward_model` turns back into an object.

Kinds register themselves: each `reward_models/<module>.py` calls `register_kind` with its
loader and, when `train_reward` can train it, its settings block and `train(ctx, cfg)`. The
package is scanned once (`kinds()`), so `train_reward`'s choices and the loader's lookup come
from that one registry. Modules of this package import torch only inside functions: stage
configs (and `heedful validate`) import them.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pipeline.schema import PromptLike

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel


@dataclass
class RewardBatch:
    """What a reward model scores. `response_token_ids` are the policy's tokens of each
    response (needed to align dense rewards); `policy_tokenizer` decodes them."""

    prompts: list[PromptLike]
    responses: list[str]
    response_token_ids: list[list[int]] | None = None
    policy_tokenizer: Any = None
    scopes: list[str | None] | None = None  # per reply: its prompt's scope (in_scope, near_scope, ...), if known

    def __len__(self) -> int:
        return len(self.responses)

    def token_ids(self) -> list[list[int]] | None:
        """The policy's token ids of each response: as given, else re-tokenized with
        `policy_tokenizer`; None when the batch has neither."""
        if self.response_token_ids is not None:
            return self.response_token_ids
        if self.policy_tokenizer is None:
            return None
        return [list(self.policy_tokenizer(r, add_special_tokens=False)["input_ids"]) for r in self.responses]


@dataclass
class Rewards:
    scalar: torch.Tensor  # [B]
    dense: torch.Tensor | None = None  # [B, T] on policy response tokens
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # per-aspect scalars, for logging
    #: [B] the part of `scalar` earned at the last response token (the EOS), on top of `dense`: a
    #: combination's scalar-only models (reward_models.combine), whose score PPO places there
    at_end: torch.Tensor | None = None


@runtime_checkable
class RewardModel(Protocol):
    kind: ClassVar[str]

    def score(self, batch: RewardBatch) -> Rewards: ...

    def save(self, path: Path) -> None: ...


@dataclass(frozen=True)
class Kind:
    """A registered reward-model kind. Trainable kinds (`train_reward` choices) also have the
    settings block of `train_reward` named after them and a `train(ctx, cfg) -> metrics`."""

    name: str
    load: Callable[[Path], RewardModel]
    settings: type[BaseModel] | None = None
    train: Callable[..., dict[str, Any]] | None = None
    summary: str = ""


_KINDS: dict[str, Kind] = {}
_SCANNED = False


def register_kind(
    kind: str,
    loader: Callable[[Path], RewardModel],
    settings: type[BaseModel] | None = None,
    train: Callable[..., dict[str, Any]] | None = None,
    summary: str = "",
) -> None:
    if (settings is None) != (train is None):
        raise ValueError(f"reward model kind '{kind}': a trainable kind gives both settings and train")
    _KINDS[kind] = Kind(kind, loader, settings, train, summary)


def kinds() -> dict[str, Kind]:
    """Every kind, after importing each module of this package once."""
    global _SCANNED
    if not _SCANNED:
        _SCANNED = True
        import reward_models

        for info in pkgutil.iter_modules(reward_models.__path__):
            importlib.import_module(f"reward_models.{info.name}")
    return dict(_KINDS)


def trainable_kinds() -> dict[str, Kind]:
    """The kinds `train_reward` can train, in registration order."""
    return {name: k for name, k in kinds().items() if k.settings is not None}


DESCRIPTOR = "reward_model.json"


def write_descriptor(path: Path, kind: str, **info: Any) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / DESCRIPTOR).write_text(json.dumps({"kind": kind, **info}, indent=2))


def read_descriptor(path: str | Path) -> dict[str, Any]:
    """The folder's `reward_model.json`: its kind and what its loader needs."""
    info: dict[str, Any] = json.loads((Path(path) / DESCRIPTOR).read_text())
    return info


def check_init(path: str | Path, kind: str, base: str) -> dict[str, Any]:
    """The descriptor of `path`, a reward model that `train_reward` continues (its `init`
    input), after checking it can be continued: the same kind and the same base model.

    Why refuse rather than adapt: another kind's weights are another network (a token
    classifier is not a sequence classifier), and another base's adapter does not fit the
    base it would be loaded on; a silent fresh start would hide that the refresh did not happen.
    """
    from pipeline.errors import HeedfulError

    path = Path(path)
    if not (path / DESCRIPTOR).is_file():
        raise HeedfulError(f"train_reward: input 'init' {path}: not a reward model folder ({DESCRIPTOR} missing)")
    info = read_descriptor(path)
    if info.get("kind") != kind:
        raise HeedfulError(
            f"train_reward: input 'init' {path}: a '{info.get('kind')}' reward model cannot initialise a '{kind}' one "
            "(the init's kind must be the stage's `kind`)"
        )
    if not same_base(str(info.get("base_model")), base):
        raise HeedfulError(
            f"train_reward: input 'init' {path}: trained on base model '{info.get('base_model')}', this stage trains "
            f"on '{base}' (set `base_model` to the init's, or start without `init`)"
        )
    return info


def same_base(a: str, b: str) -> bool:
    """Two base-model names for the same model (an alias and its folder count as one)."""
    if a == b:
        return True
    from pipeline.errors import HeedfulError

    from .common import resolve_base

    try:
        return Path(resolve_base(a)).resolve() == Path(resolve_base(b)).resolve()
    except (HeedfulError, OSError, RuntimeError, ValueError):  # an unresolvable name is not the same model as anything else
        return False


def record_init(path: Path, init: Path) -> None:
    """Note in the trained model's descriptor which reward model it continued (provenance)."""
    info = read_descriptor(path)
    write_descriptor(path, info.pop("kind"), **info, init=str(init))


def load_reward_model(path: str | Path) -> RewardModel:
    path = Path(path)
    descriptor = path / DESCRIPTOR
    if not descriptor.is_file():
        raise FileNotFoundError(f"{path}: not a reward model folder (reward_model.json missing)")
    kind = read_descriptor(path)["kind"]
    known = _KINDS if kind in _KINDS else kinds()
    if kind not in known:
        raise ValueError(f"{path}: unknown reward model kind '{kind}' (known: {', '.join(sorted(known))})")
    return known[kind].load(path)
