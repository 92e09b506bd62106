"""One protocol for every reward model: `score(batch) -> Rewards(scalar [B], dense [B, T] | None)`.

`dense[b, t]` is the reward at the policy's t-th *response* token of sample b (aligned to the
policy tokenizer, zero-padded to T = the longest response); fine-grained models fill it,
others leave it None. PPO, rejection sampling and Argilla suggestions all call `score`.
A trained reward model is a folder with `reward_model.json` ({"kind": ...}) that
`load_reward_model` turns back into an object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch

from pipeline.schema import PromptLike


@dataclass
class RewardBatch:
    """What a reward model scores. `response_token_ids` are the policy's tokens of each
    response (needed to align dense rewards); `policy_tokenizer` decodes them."""

    prompts: list[PromptLike]
    responses: list[str]
    response_token_ids: list[list[int]] | None = None
    policy_tokenizer: Any = None

    def __len__(self) -> int:
        return len(self.responses)


@dataclass
class Rewards:
    scalar: torch.Tensor  # [B]
    dense: torch.Tensor | None = None  # [B, T] on policy response tokens
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # per-aspect scalars, for logging


@runtime_checkable
class RewardModel(Protocol):
    kind: ClassVar[str]

    def score(self, batch: RewardBatch) -> Rewards: ...

    def save(self, path: Path) -> None: ...


_KINDS: dict[str, Callable[[Path], RewardModel]] = {}


def register_kind(kind: str, loader: Callable[[Path], RewardModel]) -> None:
    _KINDS[kind] = loader


DESCRIPTOR = "reward_model.json"


def write_descriptor(path: Path, kind: str, **info: Any) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / DESCRIPTOR).write_text(json.dumps({"kind": kind, **info}, indent=2))


def read_descriptor(path: str | Path) -> dict[str, Any]:
    """The folder's `reward_model.json`: its kind and what its loader needs."""
    return json.loads((Path(path) / DESCRIPTOR).read_text())


def load_reward_model(path: str | Path) -> RewardModel:
    path = Path(path)
    descriptor = path / DESCRIPTOR
    if not descriptor.is_file():
        raise FileNotFoundError(f"{path}: not a reward model folder (reward_model.json missing)")
    kind = read_descriptor(path)["kind"]
    if kind not in _KINDS:
        import importlib

        for module in ("plove", "followup", "fine_grained", "function", "combine", "rules"):
            try:
                importlib.import_module(f"reward_models.{module}")
            except ModuleNotFoundError:
                pass
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown reward model kind '{kind}' (known: {', '.join(sorted(_KINDS))})")
    return _KINDS[kind](path)
