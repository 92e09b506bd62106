"""Several reward models as one per-token reward: each objective is placed on the response
tokens by its own kind (dense where it has token rewards, else its score at the last token: the EOS),
then weighted and summed. Each objective's mean is kept apart for logging, so a run shows
which objective moved (and whether one is being gamed while another falls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reward_models.base import RewardBatch, RewardModel

from .shaping import per_token_rewards


@dataclass
class Objective:
    name: str
    model: RewardModel
    weight: float = 1.0
    #: log the model's components under their own names (a combination of objectives:
    #: `reward_models.combine` reports each objective's raw score as a component)
    flatten: bool = False


@dataclass
class ObjectiveScores:
    per_token: torch.Tensor  # [B, R] weighted sum over objectives
    means: dict[str, float]  # objective (and component) -> mean per-reply score, unweighted
    per_reply: dict[str, list[float]]  # objective -> per-reply score, unweighted (for sample logs)


def score_objectives(
    objectives: list[Objective], batch: RewardBatch, lengths: torch.Tensor, text_lengths: torch.Tensor, width: int
) -> ObjectiveScores:
    device = lengths.device
    total = torch.zeros(len(batch), width, device=device)
    means: dict[str, float] = {}
    per_reply: dict[str, list[float]] = {}
    for objective in objectives:
        rewards = objective.model.score(batch)
        scalar = rewards.scalar.detach().float().to(device)
        if scalar.shape != (len(batch),):
            raise ValueError(
                f"reward model '{objective.name}' returned scalar of shape {tuple(scalar.shape)}, expected ({len(batch)},)"
            )
        dense = rewards.dense.detach().to(device) if rewards.dense is not None else None
        at_end = rewards.at_end.detach().to(device) if rewards.at_end is not None else None
        tokens = per_token_rewards(scalar, dense, lengths, text_lengths, width, at_end)
        total += objective.weight * tokens
        reply = tokens.sum(1) if dense is not None else scalar
        if objective.flatten:
            for component, values in rewards.components.items():
                means[component] = float(values.float().mean())
                if "/" not in component:
                    per_reply[component] = values.float().tolist()
            for key, value in (getattr(objective.model, "last_stats", None) or {}).items():
                if key.endswith(("/share", "/weight")):
                    means.setdefault(key, float(value))
            continue
        means[objective.name] = float(reply.mean())
        per_reply[objective.name] = reply.tolist()
        for component, values in rewards.components.items():
            means[f"{objective.name}/{component}"] = float(values.float().mean())
    return ObjectiveScores(total, means, per_reply)
