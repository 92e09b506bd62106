"""LoRA dropout on CPU without torch's slow Bernoulli sampler.

Why: PEFT applies `nn.Dropout(lora_dropout)` to the input of every LoRA layer (7 per block
with `all-linear`). On CPU, torch draws that mask with `bernoulli_`, about 6 ns per element,
and keeps it as a float tensor for backward: in a LoRA-DPO step of SmolLM2-135M (4 pairs x
~256 tokens) the profile put 16% of the step in `bernoulli_` alone, more than attention.

`CpuDropout` is the same dropout (each element zeroed with probability p, the rest scaled by
1 / (1 - p)) with its mask drawn from numpy's SFC64 generator, 16 random bits per element
(about 0.5 ns each), and kept as a bool tensor (a quarter of the memory). Each call seeds
SFC64 from torch's default generator, so `torch.manual_seed` (which the HF Trainer sets from
`seed`) still makes a run repeatable. Two honest differences from `nn.Dropout`, neither of
which changes what training means: the mask is a different random draw than torch's for the
same seed, and p is rounded to a multiple of 1/65536 (0.05 -> 0.0500031), the scale matching
the rounded p so the expected output equals the input exactly. Off CPU (CUDA's fused dropout
is already fast), in eval mode, or at p = 0 or 1 it is `nn.Dropout`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

#: resolution of the drop probability: one 16-bit random number per element
LEVELS = 1 << 16


def keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """A bool mask of `shape`, each element True (kept) with probability 1 - p', and the scale
    1 / (1 - p'), where p' is p rounded to a multiple of 1/65536."""
    threshold = round(p * LEVELS)
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)  # 4 x 16 random bits per 64-bit word
    bits = words.view(np.uint16)[:n]
    keep = torch.from_numpy(np.greater_equal(bits, threshold)).view(shape)
    return keep, LEVELS / (LEVELS - threshold)


class CpuDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training mask comes from `keep_mask` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0:
            return super().forward(x)
        keep, scale = keep_mask(x.shape, self.p)
        return torch.where(keep, x, 0.0).mul_(scale)  # autograd keeps the bool mask only


def use_cpu_lora_dropout(model: Any) -> int:
    """Replace the `nn.Dropout` of every PEFT LoRA layer of `model` by `CpuDropout` (same p,
    same training flag); returns how many were replaced. Idempotent; a model without LoRA
    dropout (p = 0 is `nn.Identity` in PEFT) is left as it is."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is nn.Dropout:
                fast = CpuDropout(dropout.p, dropout.inplace)
                fast.train(dropout.training)
                dropouts[name] = fast
                replaced += 1
    return replaced
