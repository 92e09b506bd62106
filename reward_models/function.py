"""A reward that is a plain Python function, named `module:function`.

The function takes `(prompts, responses)` and returns one float per reply (a list or a
tensor), e.g. a keyword or length heuristic, a regex check, or a call to an external judge:

    def brevity(prompts, responses):
        return [-len(r.split()) / 100 for r in responses]

    rm = FunctionReward("my_rewards:brevity")
    rm.save("rewards/brevity")          # reward_model.json {"kind": "function", "target": ...}
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

from .base import RewardBatch, Rewards, read_descriptor, register_kind, write_descriptor


def resolve_target(target: str):
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function '{target}': expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward function '{target}' cannot be imported: {exc}") from None
    if not callable(fn):
        raise ValueError(f"reward function '{target}' is not callable")
    return fn


class FunctionReward:
    kind: ClassVar[str] = "function"

    def __init__(self, target: str):
        self.target = target
        self.fn = resolve_target(target)

    @classmethod
    def load(cls, path: Path) -> FunctionReward:
        return cls(read_descriptor(path)["target"])

    def score(self, batch: RewardBatch) -> Rewards:
        import torch

        values: Any = self.fn(batch.prompts, batch.responses)
        scalar = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if scalar.shape[0] != len(batch):
            raise ValueError(f"reward function '{self.target}' returned {scalar.shape[0]} values for {len(batch)} replies")
        return Rewards(scalar=scalar, components={self.target: scalar})

    def save(self, path: Path) -> None:
        write_descriptor(Path(path), self.kind, target=self.target)


register_kind(FunctionReward.kind, FunctionReward.load)
