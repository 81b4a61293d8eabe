"""Drop the last blocks but one: the k blocks just before the final block, n-1-k .. n-2.

A common heuristic (deeper blocks are the most redundant, Gromov et al. 2024; the final block is kept
because it maps into the output space). Protected blocks are skipped by moving further back: the k highest
non-protected indices below n-1 are removed, and the final block only when nothing else is left. Zero
forward passes; no scores.
"""

from __future__ import annotations

import time

from layershap.models.layers import num_layers
from layershap.plan.methods._common import removable
from layershap.plan.methods.base import Plan


def last(model, windows, k: int, *, protect=(), **_) -> Plan:
    start = time.perf_counter()
    n = num_layers(model)
    allowed = set(removable(n, k, protect))
    order = [i for i in [*range(n - 2, -1, -1), n - 1] if i in allowed]
    return Plan("last", n, sorted(order[:k]), None, forward_passes=0, seconds=time.perf_counter() - start)
