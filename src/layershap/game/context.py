"""What a stored evaluation is keyed by: which model measured it, and under which conditions.

A stored NLL may be reused only for the same model (`model_fingerprint`) measured the same way
(`measurement_context`); both are short hex digests so they can key rows of the evaluation store.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import torch

from layershap.data.windows import tokens_fingerprint

if TYPE_CHECKING:
    from layershap.game.layer_game import LayerGame


def model_fingerprint(model) -> str:
    """Identifies weights and config without hashing every byte of a multi-GB model.

    Each tensor contributes its name, shape, dtype and a strided sample of at most 65,536 of its values,
    so any different checkpoint, fine-tune or pruning changes the fingerprint in practice.
    """
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 65536)
            sample = flat[::step].to("cpu", torch.float64).numpy()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def measurement_context(game: LayerGame) -> str:
    """What a stored NLL depends on besides the model and the mask: the exact windows and the dtype."""
    dtype = next(game.model.parameters()).dtype
    players = "|sublayer" if getattr(game, "granularity", "block") == "sublayer" else ""  # block keys unchanged
    return hashlib.sha256(f"{tokens_fingerprint(game.tokens)}|mean_nll|{dtype}{players}".encode()).hexdigest()[:16]
