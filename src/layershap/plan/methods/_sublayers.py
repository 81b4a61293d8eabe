"""What the sublayer methods share: players `attn.i` (2i) and `mlp.i` (2i+1), the parameter target of a
ratio, and the record of a sublayer plan.

A sublayer method is `(model, windows, ratio, **options) -> Plan` whose `Plan.remove` holds player indices
and whose plan removes sublayers whose parameters add up to at least `ratio` of the decoder blocks'.
"""

from __future__ import annotations

import numpy as np

from layershap.errors import LayershapError
from layershap.models.layers import num_layers
from layershap.models.sublayers import (
    block_parameters,
    kv_cache_fraction_removed,
    sublayer_names,
    sublayer_parameters,
)
from layershap.plan.methods._common import removable
from layershap.plan.methods.base import Cost, Plan
from layershap.plan.ratio import check_ratio


def parameter_target(model, ratio: float) -> tuple[np.ndarray, float]:
    """Each sublayer's parameters and the parameters a plan of this ratio must remove."""
    check_ratio(ratio)
    return sublayer_parameters(model), ratio * block_parameters(model)


def allowed_players(n: int, protect=()) -> list[int]:
    """Sublayers of the blocks that are not protected."""
    return [j for i in removable(n, 0, protect) for j in (2 * i, 2 * i + 1)]


def reaches(mask: np.ndarray, params: np.ndarray, target: float) -> bool:
    return float(params[~np.asarray(mask, dtype=bool)].sum()) >= target - 1e-6


def drop_in_order(order, params: np.ndarray, target: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Drop the sublayers of `order` one after another until the target is reached (a LayershapError if the
    order runs out first)."""
    mask = np.ones(len(params), dtype=bool) if mask is None else mask.copy()
    for j in order:
        if reaches(mask, params, target):
            break
        mask[j] = False
    if not reaches(mask, params, target):
        raise LayershapError(f"the sublayers that may be removed hold {float(params[~mask].sum()):.0f} "
                             f"parameters, fewer than the {target:.0f} the ratio asks for; lower --ratio or "
                             "protect fewer blocks")
    return mask


def sublayer_record(model, mask) -> dict:
    """The removed sublayers, the parameters removed and the KV-cache share a sublayer plan saves."""
    mask = np.asarray(mask, dtype=bool)
    params = sublayer_parameters(model)
    names = sublayer_names(num_layers(model))
    return {"granularity": "sublayer",
            "removed_sublayers": [names[j] for j in np.flatnonzero(~mask)],
            "parameters_removed": int(params[~mask].sum()),
            "parameter_fraction_removed": float(params[~mask].sum() / block_parameters(model)),
            "kv_cache_fraction_removed": kv_cache_fraction_removed(mask)}


def sublayer_plan_result(name: str, model, mask, scores, forward_passes: int, seconds: float, details: dict,
                         cost: Cost | None = None) -> Plan:
    mask = np.asarray(mask, dtype=bool)
    return Plan(name, len(mask), [int(j) for j in np.flatnonzero(~mask)], scores, forward_passes=forward_passes,
                seconds=seconds, details={**sublayer_record(model, mask), **details}, cost=cost)
