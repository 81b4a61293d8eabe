"""ShortGPT (Men et al., 2024): a block whose output barely differs in direction from its input matters little.

Block influence BI_i = 1 - mean over tokens of cos(input_i, output_i), from one forward pass over the
calibration windows; the k blocks with the lowest BI are removed.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from layershap.methods.base import Plan, lowest_scoring
from layershap.models.layers import num_layers
from layershap.models.trace import block_io


def block_influence(model, tokens: torch.Tensor, *, batch_size: int = 8) -> list[float]:
    n = num_layers(model)
    sums = torch.zeros(n, dtype=torch.float64)
    count = 0

    def record(index, hidden_in, hidden_out):
        cos = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
        sums[index] += (1.0 - cos).double().sum().cpu()

    device = next(model.parameters()).device
    with torch.inference_mode(), block_io(model, record):
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
    return (sums / count).tolist()


def shortgpt(model, windows, k: int, *, protect=(), batch_size: int = 8, **_) -> Plan:
    start = time.perf_counter()
    scores = block_influence(model, windows.tokens, batch_size=batch_size)
    return Plan("shortgpt", len(scores), lowest_scoring(scores, k, protect), scores, forward_passes=1,
                seconds=time.perf_counter() - start)
