"""Perplexity: the mean next-token negative log-likelihood over token windows, exponentiated."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# A per-batch loss: (model, batch of windows, index of the batch's first window) -> (summed loss, positions
# scored). `batch_nll` is the NLL one; `game/kl.py`'s dense reference is the KL one. The mean over windows
# (`mean_loss`) and prefix sharing (`game/prefix.py`) run the same loop whichever it is.
BatchLoss = Callable[[object, torch.Tensor, int], tuple[float, int]]


def batch_nll(model, batch: torch.Tensor, start: int = 0) -> tuple[float, int]:
    """Summed NLL (float64) of every token but each window's first, and how many tokens that is (`start`, the
    batch's place among the windows, is part of the `BatchLoss` signature and not needed here)."""
    logits = model(input_ids=batch, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
    return float(loss.double()), batch[:, 1:].numel()


def mean_loss(model, tokens: torch.Tensor, *, batch_size: int = 8, loss: BatchLoss = batch_nll) -> float:
    """Mean per-position `loss` over `tokens` ([windows, seq_len]) under the model as it is now, batch by
    batch; the batches' sums are added in float64."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            summed, scored = loss(model, tokens[start:start + batch_size].to(device), start)
            total += summed
            count += scored
    return total / count


def mean_nll(model, tokens: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean NLL (nats per predicted token) of `tokens` ([windows, seq_len]) under the model as it is now.

    The sum is taken in float64 so the result does not depend on the batch size beyond float32 rounding of
    the logits.
    """
    return mean_loss(model, tokens, batch_size=batch_size, loss=batch_nll)


def perplexity(model, tokens: torch.Tensor, *, batch_size: int = 8) -> float:
    """exp(mean NLL); inf when the model diverges."""
    nll = mean_nll(model, tokens, batch_size=batch_size)
    return math.exp(nll) if nll < 700 else math.inf


def perplexities_of(model, windows: dict, *, batch_size: int = 8) -> dict[str, float]:
    """Perplexity on each named set of windows ({name: TextWindows}): what every run reports before and after."""
    return {name: perplexity(model, w.tokens, batch_size=batch_size) for name, w in windows.items()}
