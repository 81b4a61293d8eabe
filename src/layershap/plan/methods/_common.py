"""Small checks and helpers shared by the baseline methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layershap.errors import LayershapError


def removable(n: int, k: int, protect: Sequence[int] = ()) -> list[int]:
    """The blocks that may be removed (all but the protected ones), after checking k and protect."""
    protected = set()
    for i in protect:
        i = int(i)
        if not 0 <= i < n:
            raise LayershapError(f"protected layer {i} does not exist: the model has layers 0..{n - 1}")
        protected.add(i)
    candidates = [i for i in range(n) if i not in protected]
    if k < 0:
        raise LayershapError(f"cannot remove {k} layers; give a number of layers >= 0")
    if k > len(candidates):
        raise LayershapError(f"cannot remove {k} layers: only {len(candidates)} are not protected; "
                             "protect fewer layers or lower --ratio")
    return candidates


def tokens_of(windows) -> torch.Tensor:
    """The `[samples, seq_len]` token tensor of a `TextWindows` (or the tensor itself)."""
    return getattr(windows, "tokens", windows)


def model_device(model) -> torch.device:
    return next(model.parameters()).device
