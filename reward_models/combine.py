"""Several reward models as one: z-score each with running statistics, weight, sum.

    combined = CombinedReward.from_settings(CombineSettings(objectives=[
        {"path": "runs/r/plove/reward_model", "weight": 1.0},
        {"path": "runs/r/relevance/reward_model", "weight": 0.5}]))
    out = combined.score(batch)       # Rewards: scalar [B], dense [B, T] when any model is dense
    combined.last_stats               # per-objective raw mean/std, z mean, share, effective weight

Per objective k, per reply b:  z_k = clip((s_k - mean_k) / std_k),  c_k = w_k' * z_k,
scalar = sum_k c_k. mean_k/std_k are running statistics (Welford, updated with every scored
batch before normalising, like OpenRLHF's reward normalisation); `state_dict()` carries them
across a resumed PPO run.

Dense rewards: a dense model's per-token rewards are divided by std_k and the remainder that
makes its row sum equal z_k goes to the last text token, so the per-segment shape is kept. A
scalar-only model's c_k is not on the text tokens but in `at_end`, which PPO places at the last
response token (the EOS), as it places a lone scalar model's score: on the last text token it
was earned before the choice to stop, so stopping earned nothing and one more token all of it.
So sum_t dense + at_end = scalar.

Guard against one objective dominating (RLUF saw reward hacking when optimising reactions
alone): share_k = w_k * mean_b |z_k| / sum_j w_j * mean_b |z_j|. If a share exceeds
`max_share`, that objective's effective weight w_k' is scaled down for this batch until its
share equals `max_share` (the others keep theirs); z-clipping bounds single outliers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.paths import ConfigPath
from pipeline.stage import StageConfig

from .base import RewardBatch, Rewards, load_reward_model, read_descriptor, register_kind, write_descriptor

#: reward-model inputs a stage may wire (ppo's); an objective's `input` names one of them
REWARD_INPUTS = ("reward_model", "reward_model_2", "reward_model_3")


class ObjectiveSpec(StageConfig):
    """One reward in a weighted combination: a reward-model folder (`path`), a reward-model
    input the stage wires (`input`, ppo) or an inline rule (`rule`, reward_models.rules)."""

    name: str | None = Field(
        default=None, description="label in logs, curves and the report; default: the input, the rule's name or the folder's kind"
    )
    path: ConfigPath | None = Field(default=None, description="reward model folder (reward_model.json inside)")
    input: Literal["reward_model", "reward_model_2", "reward_model_3"] | None = None
    rule: dict[str, Any] | None = Field(default=None, description="e.g. {rule: token_class, pattern: '\\\\d'}")
    weight: float = 1.0
    normalize: bool | None = Field(
        default=None,
        description="z-score with running mean/std before weighting; "
        "default: the combination's own setting (CombineSettings: on; ppo: normalize_rewards)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ObjectiveSpec:
        if sum(x is not None for x in (self.path, self.input, self.rule)) != 1:
            raise ValueError("give exactly one of path, input or rule")
        if self.rule is not None:
            from .rules import build_rule

            build_rule(self.rule)  # fail at validation, not after loading a model
        return self

    def fingerprint_folders(self) -> tuple[str, ...]:
        """The reward model folder, by content (pipeline/fingerprint.py)."""
        return ("path",)

    @property
    def label(self) -> str | None:
        """The objective's name; None for a folder without `name` (named by its kind on load)."""
        if self.name or self.input:
            return self.name or self.input
        return str(self.rule.get("name") or self.rule.get("rule")) if self.rule is not None else None


class CombineSettings(StageConfig):
    """Weighted sum of reward models, each z-scored with running statistics."""

    objectives: list[ObjectiveSpec] = Field(min_length=1, description="each with a `path`")
    clip: float | None = Field(default=5.0, gt=0, description="clip each z-score to [-clip, clip]")
    max_share: float | None = Field(
        default=0.75,
        gt=0,
        le=1,
        description="cap on one objective's share of the batch's total |weighted reward| (guard against one dominating)",
    )


class RunningMeanStd:
    """Welford's running mean and variance over every value seen."""

    def __init__(self, count: int = 0, mean: float = 0.0, m2: float = 0.0):
        self.count, self.mean, self.m2 = count, mean, m2

    def update(self, values) -> None:
        for x in [float(v) for v in values]:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def state(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}


@dataclass
class Objective:
    name: str
    model: Any
    weight: float = 1.0
    normalize: bool = True
    path: str | None = None


def capped_weights(weights: list[float], magnitudes: list[float], max_share: float | None) -> list[float]:
    """Scale down the weight of any objective whose share of sum_k |w_k| * m_k exceeds
    `max_share`, so its share becomes exactly `max_share` (repeated until none exceeds)."""
    w = list(weights)
    if max_share is None or len(w) < 2:
        return w
    capped: set[int] = set()
    for _ in range(len(w)):
        contrib = [abs(wk) * mk for wk, mk in zip(w, magnitudes)]
        total = sum(contrib)
        if total <= 0:
            return w
        worst = max(range(len(w)), key=lambda k: contrib[k] / total)
        if contrib[worst] / total <= max_share + 1e-9 or worst in capped:
            return w
        rest = total - contrib[worst]
        if rest <= 0:
            return w  # nothing else carries signal; there is nothing to balance against
        target = max_share * rest / (1 - max_share) if max_share < 1 else contrib[worst]
        w[worst] *= target / contrib[worst]
        capped.add(worst)
    return w


class CombinedReward:
    kind: ClassVar[str] = "combined"

    def __init__(
        self,
        objectives: list[Objective],
        clip: float | None = 5.0,
        max_share: float | None = 0.75,
        update_stats: bool = True,
        eps: float = 1e-6,
    ):
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique: {names}")
        self.objectives, self.clip, self.max_share = objectives, clip, max_share
        self.update_stats, self.eps = update_stats, eps
        self.stats = {o.name: RunningMeanStd() for o in objectives}
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings, device: str | None = None) -> CombinedReward:
        objectives: list[Objective] = []
        for spec in settings.objectives:
            normalize = True if spec.normalize is None else spec.normalize
            if spec.path is None:
                raise ValueError(f"objective '{spec.label}': a combination loaded on its own names reward-model folders (path)")
            objectives.append(
                Objective(
                    spec.name or _default_name(spec.path, objectives),
                    load_reward_model(spec.path),
                    spec.weight,
                    normalize,
                    spec.path,
                )
            )
        return cls(objectives, settings.clip, settings.max_share)

    @classmethod
    def load(cls, path: Path) -> CombinedReward:
        info = read_descriptor(path)
        combined = cls.from_settings(CombineSettings.model_validate(info["settings"]))
        combined.load_state_dict(info.get("stats", {}))
        return combined

    def score(self, batch: RewardBatch) -> Rewards:
        import torch

        results = {o.name: o.model.score(batch) for o in self.objectives}
        ids = batch.token_ids()
        lengths = None if ids is None else [len(row) for row in ids]
        width = max(lengths) if lengths is not None and lengths else 0
        dense = torch.zeros(len(batch), width) if lengths is not None else None
        at_end = torch.zeros(len(batch)) if lengths is not None else None
        zs, raw_std = {}, {}
        for o in self.objectives:
            raw = results[o.name].scalar.detach().float().cpu()
            stats = self.stats[o.name]
            if self.update_stats and o.normalize:
                stats.update(raw.tolist())
            mean, std = (stats.mean, max(stats.std, self.eps)) if o.normalize else (0.0, 1.0)
            z = (raw - mean) / std
            zs[o.name] = z.clamp(-self.clip, self.clip) if self.clip else z
            raw_std[o.name] = std
        magnitudes = [float(zs[o.name].abs().mean()) for o in self.objectives]
        weights = capped_weights([o.weight for o in self.objectives], magnitudes, self.max_share)
        scalar = torch.zeros(len(batch))
        components: dict[str, torch.Tensor] = {}
        total_mag = sum(abs(w) * m for w, m in zip(weights, magnitudes)) or 1.0
        self.last_stats = {}
        for o, w, m in zip(self.objectives, weights, magnitudes):
            z = zs[o.name]
            scalar += w * z
            components[o.name] = results[o.name].scalar.detach().float().cpu()
            components[f"{o.name}/z"] = z
            for key, value in results[o.name].components.items():
                components.setdefault(f"{o.name}/{key}" if key != o.name else o.name, value)
            if dense is not None and at_end is not None and lengths is not None:  # all None without token ids
                if results[o.name].dense is None:
                    at_end += w * z
                else:
                    dense += w * _dense_z(results[o.name].dense, z, raw_std[o.name], lengths, width)
            self.last_stats.update(
                {
                    f"{o.name}/raw_mean": float(components[o.name].mean()),
                    f"{o.name}/raw_std": float(components[o.name].std()) if len(batch) > 1 else 0.0,
                    f"{o.name}/z_mean": float(z.mean()),
                    f"{o.name}/share": abs(w) * m / total_mag,
                    f"{o.name}/weight": w,
                    f"{o.name}/running_mean": self.stats[o.name].mean,
                    f"{o.name}/running_std": self.stats[o.name].std,
                }
            )
        return Rewards(scalar=scalar, dense=dense, components=components, at_end=at_end)

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {name: s.state() for name, s in self.stats.items()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        for name, s in state.items():
            if name in self.stats:
                self.stats[name] = RunningMeanStd(int(s["count"]), float(s["mean"]), float(s["m2"]))

    def save(self, path: Path) -> None:
        missing = [o.name for o in self.objectives if o.path is None]
        if missing:
            raise ValueError(f"objectives {missing} have no folder; build the combination from saved reward models")
        settings = {
            "objectives": [
                {"path": o.path, "weight": o.weight, "name": o.name, "normalize": o.normalize} for o in self.objectives
            ],
            "clip": self.clip,
            "max_share": self.max_share,
        }
        write_descriptor(Path(path), self.kind, settings=settings, stats=self.state_dict())


def _dense_z(dense, z, std: float, lengths: list[int], width: int):
    """A dense model's contribution on tokens: its dense rewards / std, plus the remainder that
    makes each row sum to z at the last text token."""
    import torch

    out = torch.zeros(len(lengths), width)
    d = dense.detach().float().cpu()[:, :width] / std
    out[:, : d.shape[1]] = d
    rest = z - out.sum(dim=1)
    for b, n in enumerate(lengths):
        if n:
            out[b, n - 1] += rest[b]
    return out


def _default_name(path: str, existing: list[Objective]) -> str:
    try:
        name = read_descriptor(path)["kind"]
    except (OSError, KeyError, json.JSONDecodeError):
        name = Path(path).name
    taken = {o.name for o in existing}
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


register_kind(CombinedReward.kind, CombinedReward.load)
