"""ShortGPT (Men et al., 2024): a block whose output barely differs in direction from its input matters little.

Block influence BI_i = 1 - mean over tokens of cos(input_i, output_i), from one forward pass over the
calibration windows; the k blocks with the lowest BI are removed.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from layershap.models.layers import num_layers
from layershap.models.trace import traced_pass
from layershap.plan.methods.base import Cost, Plan, lowest_scoring


class BlockInfluence:
    """Watches a traced pass (`models.trace.traced_pass`) and sums 1 - cos(input, output) per block."""

    def __init__(self, n_blocks: int):
        self.sums = torch.zeros(n_blocks, dtype=torch.float64)

    def __call__(self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        cos = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
        self.sums[index] += (1.0 - cos).double().sum().cpu()

    def scores(self, tokens: int) -> list[float]:
        """Block influence per block: the mean over the `tokens` positions the pass ran on."""
        return (self.sums / tokens).tolist()


def block_influence(model, tokens: torch.Tensor, *, batch_size: int = 8) -> list[float]:
    recorder = BlockInfluence(num_layers(model))
    traced_pass(model, tokens, recorder, batch_size=batch_size)
    return recorder.scores(tokens.numel())


def shortgpt(model, windows, k: int, *, protect=(), batch_size: int = 8, **_) -> Plan:
    start = time.perf_counter()
    scores = block_influence(model, windows.tokens, batch_size=batch_size)
    return Plan("shortgpt", len(scores), lowest_scoring(scores, k, protect), scores, forward_passes=1,
                seconds=time.perf_counter() - start,
                cost=Cost.full_passes(1, int(windows.tokens.numel()), len(scores)))
