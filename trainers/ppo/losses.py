"""PPO's clipped objectives and the diagnostics that go with them (all token-level means)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.sequences import masked_mean


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of tokens where the clipped term was the one used
    approx_kl: torch.Tensor  # 0.5 * E[(log pi_new - log pi_old)^2]: how far this update moved
    ratio_mean: torch.Tensor


@dataclass
class ValueLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> PolicyLoss:
    """L = E_t[max(-A_t r_t, -A_t clip(r_t, 1-eps, 1+eps))], r_t = pi_new / pi_old (Schulman et al., 2017)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl, ratio_mean)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> ValueLoss:
    """0.5 * E_t[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)]: the value may not jump
    further than `clip` from its rollout estimate in one update."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_err > unclipped_err).to(values.dtype), mask)
    return ValueLoss(loss, clip_fraction)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of softmax(logits) over the last axis: logsumexp(l) - sum(p * l)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better than a constant."""
    from .masked import masked_var

    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)
