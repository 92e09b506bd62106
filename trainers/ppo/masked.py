"""Statistics over the valid (mask == 1) response tokens of a right-padded batch."""

from __future__ import annotations

import torch

from trainers.sequences import masked_mean


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all valid tokens; unbiased (n-1) like numpy's ddof=1 when asked."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over valid tokens. `shift_mean=False` adds the mean back: deviations get
    unit spread but the batch's average reward stays (FineGrainedRLHF's reward whitening).
    Padding stays 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
