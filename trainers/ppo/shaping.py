"""From reward-model scores to per-token rewards: placement, KL shaping, whitening.

Conventions (shared with `reward_models.base`): a response is its tokens up to and
including the first EOS; `dense[b, t]` belongs to response token t (the EOS token itself
gets nothing from dense models); a scalar score is earned at the last response token
(the EOS, or the last token of a reply cut off by the length limit).
"""

from __future__ import annotations

from typing import Literal

import torch

from .masked import masked_whiten

KlEstimator = Literal["k1", "k2", "k3", "abs"]


def place_scalar(scalar: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B] scores -> [B, width] with each score at position length - 1."""
    if (lengths < 1).any() or (lengths > width).any():
        raise ValueError(f"response lengths must be in [1, {width}], got {lengths.tolist()}")
    out = torch.zeros(scalar.shape[0], width, dtype=torch.float32, device=scalar.device)
    out[torch.arange(scalar.shape[0], device=scalar.device), lengths - 1] = scalar.float()
    return out


def place_dense(dense: torch.Tensor, text_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Crop/pad a reward model's [B, T'] dense rewards to the rollout's [B, width].

    A dense reward beyond a reply's own tokens means the model aligned it to some other
    tokenization; that is an error, not something to silently drop.
    """
    B, T = dense.shape
    positions = torch.arange(T, device=dense.device).unsqueeze(0)
    stray = (positions >= text_lengths.to(dense.device).unsqueeze(1)) & (dense != 0)
    if stray.any():
        b, t = stray.nonzero()[0].tolist()
        raise ValueError(
            f"dense reward at token {t} of response {b}, which has only {int(text_lengths[b])} tokens: "
            "dense rewards must be aligned to the policy's response tokens (reward_models.base)"
        )
    out = torch.zeros(B, width, dtype=torch.float32, device=dense.device)
    keep = min(T, width)
    out[:, :keep] = dense[:, :keep].float()
    return out


def per_token_rewards(
    scalar: torch.Tensor,
    dense: torch.Tensor | None,
    lengths: torch.Tensor,
    text_lengths: torch.Tensor,
    width: int,
    at_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense rewards where the model gives them, else the scalar at the last token.

    `at_end` (a combination's scalar-only models, `Rewards.at_end`) is added at the last token
    too, beside the dense rewards: on the text tokens a score would be earned before the
    choice to stop, so stopping would earn nothing and one more token the whole score.
    A reply with no text tokens (EOS first) cannot carry dense rewards; it gets its scalar
    at the EOS so an empty reply is never free of its score.
    """
    if dense is None:
        return place_scalar(scalar, lengths, width)
    out = place_dense(dense, text_lengths, width)
    end = at_end.float().to(scalar.device) if at_end is not None else torch.zeros_like(scalar.float())
    end = torch.where(text_lengths == 0, scalar.float(), end)
    if end.any():
        out = out + place_scalar(end, lengths, width)
    return out


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KlEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi.

    k1 = log pi - log ref (unbiased, FineGrainedRLHF's choice, can be negative per token);
    k2 = 0.5 (log pi - log ref)^2; k3 = ref/pi - 1 - log(ref/pi) (unbiased, >= 0); abs = |k1|.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    raise ValueError(f"unknown KL estimator '{estimator}' (k1, k2, k3, abs)")


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KlEstimator = "k1",
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards_t = score_t - kl_coef * KL_t on every valid token; returns (rewards, kl).

    `whiten` rescales deviations from the batch mean to unit std over valid tokens and keeps
    the mean (FineGrainedRLHF's `whiten_rewards`): the step size stops depending on the reward scale.
    """
    mask = mask.to(scores.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * mask
    rewards = scores * mask - kl_coef * kl
    if whiten:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    return rewards, kl
