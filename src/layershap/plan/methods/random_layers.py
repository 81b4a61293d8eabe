"""Random baseline: k blocks drawn uniformly without replacement from the non-protected ones, with `seed`.

Zero forward passes; no scores. The same seed gives the same blocks.
"""

from __future__ import annotations

import time

import numpy as np

from layershap.models.layers import num_layers
from layershap.plan.methods._common import removable
from layershap.plan.methods.base import Plan


def random_layers(model, windows, k: int, *, protect=(), seed: int = 0, **_) -> Plan:
    start = time.perf_counter()
    n = num_layers(model)
    candidates = removable(n, k, protect)
    chosen = np.random.default_rng(seed).choice(candidates, size=k, replace=False) if k else []
    return Plan("random", n, sorted(int(i) for i in chosen), None, forward_passes=0,
                seconds=time.perf_counter() - start, details={"seed": seed})
