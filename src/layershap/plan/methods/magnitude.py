"""Weight magnitude: remove the blocks with the smallest mean |w| (data-free, zero forward passes).

The "Magnitude" criterion that Shortened LLaMA compares against.

A block's score is the mean absolute value of the entries of its weight matrices (every parameter with two
or more dimensions: linear and convolution weights), i.e. their L1 norm divided by their number of entries.
Vectors (norm gains, biases, per-channel constants) are left out: norm gains sit near 1 whatever the block
does and would dominate the mean. The k blocks with the lowest score are removed. Zero forward passes.
"""

from __future__ import annotations

import time

import torch

from layershap.models.layers import block_list
from layershap.plan.methods._common import removable
from layershap.plan.methods.base import Plan, lowest_scoring


def mean_abs_weight(block) -> float:
    """Mean |w| over the entries of the block's matrices (all its parameters if it has no matrix)."""
    params = [p for p in block.parameters() if p.dim() >= 2] or list(block.parameters())
    total = sum(float(p.detach().abs().sum(dtype=torch.float64)) for p in params)
    count = sum(p.numel() for p in params)
    return total / count if count else 0.0


def magnitude(model, windows, k: int, *, protect=(), **_) -> Plan:
    start = time.perf_counter()
    blocks = block_list(model)
    removable(len(blocks), k, protect)
    scores = [mean_abs_weight(block) for block in blocks]
    return Plan("magnitude", len(scores), lowest_scoring(scores, k, protect), scores, forward_passes=0,
                seconds=time.perf_counter() - start, details={"score": "mean |w| over weight matrices"})
