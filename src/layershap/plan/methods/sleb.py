"""SLEB (Song et al., 2024): greedily remove, one at a time, the block whose removal hurts NLL least.

From "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks".

At each of k steps every block still present (and not protected) is tried out: the model without it and
without the blocks removed so far is run on the calibration windows, and the block whose removal gives the
lowest mean NLL is removed for good. Because each step re-measures on the already shortened model, the
choice accounts for blocks that are redundant only together (or only apart). Ties go to the later block.

Cost: with m removable blocks, sum over steps t = 0..k-1 of (m - t) = k*m - k*(k-1)/2 forward passes; no
pass of the full model is needed. The trials of one step differ from each other in one block, so they are
run with prefix sharing (`game/prefix.py`): the same NLLs, bit for bit, in less wall time; the cost counts
each trial's kept blocks in full, as SLEB's own implementation runs them.

Scores: none (a greedy order is not a per-block importance). `details["steps"]` lists each step's removed
block and the NLL after it; `details["first_step_nll"]` is the NLL with each block alone removed (the
leave-one-out criterion; None for protected blocks).
"""

from __future__ import annotations

import math
import time

import numpy as np

from layershap.game.layer_game import LayerGame
from layershap.models.layers import num_layers
from layershap.plan.methods._common import removable, tokens_of
from layershap.plan.methods.base import Cost, Plan


def sleb_passes(m: int, k: int) -> int:
    """Forward passes SLEB spends removing k of m removable blocks."""
    return k * m - k * (k - 1) // 2


def sleb(model, windows, k: int, *, protect=(), batch_size: int = 8, **_) -> Plan:
    start = time.perf_counter()
    n = num_layers(model)
    candidates = removable(n, k, protect)
    game = LayerGame(model, windows, batch_size=batch_size)
    keep = np.ones(n, dtype=bool)
    steps, first = [], None
    cost, tokens = Cost(), int(tokens_of(windows).numel())
    for _step in range(k):
        trials = np.repeat(keep[None], len(candidates), axis=0)
        trials[np.arange(len(candidates)), candidates] = False
        trial, step_started = {}, time.perf_counter()
        for row, nll, _ in game.measure(trials):  # prefix sharing: the same NLLs as one pass per trial
            cost.add(tokens, int(trials[row].sum()) + 1)
            trial[candidates[row]] = nll if math.isfinite(nll) else math.inf
        if first is None:
            first = [trial.get(i) for i in range(n)]
        best = min(trial, key=lambda i: (trial[i], -i))
        keep[best] = False
        candidates = [i for i in candidates if i != best]
        steps.append({"removed": best, "nll": _finite_or_none(trial[best]),
                      "seconds": time.perf_counter() - step_started})
    details = {"steps": steps,
               "first_step_nll": [_finite_or_none(v) for v in first] if first is not None else None}
    return Plan("sleb", n, sorted(s["removed"] for s in steps), None, forward_passes=game.forward_passes,
                seconds=time.perf_counter() - start, details=details, cost=cost)


def _finite_or_none(value):
    return value if value is not None and math.isfinite(value) else None
