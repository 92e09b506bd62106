"""Generalized advantage estimation over per-token rewards (Schulman et al., 2016).

Each response token is one action; `rewards[b, t]` is whatever was earned at token t
(segment rewards of fine-grained models, the reply score at the last token, minus the KL
penalty at every token). The episode ends at the last valid token, so the value after it
is 0 (no bootstrap).
"""

from __future__ import annotations

import torch


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (advantages, returns), both [B, T] and 0 on padding.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};
    returns_t = A_t + V_t (the value target). `mask` must be a prefix of ones per row
    (right padding), which is how rollouts lay out responses.
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"shapes differ: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, mask {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values
