"""BlockPruner's greedy sublayer removal (Zhong et al., 2024, arXiv 2406.10594), at a parameter ratio.

Each step measures, on the calibration windows, the model with each remaining attention or MLP sublayer
removed in turn, and removes the one whose removal gives the lowest perplexity; steps repeat until the removed
sublayers' parameters reach the ratio of the blocks' parameters. That is about K x 2n evaluations for K steps;
`forward_passes` counts every distinct plan it measured (the store may have held some, they count anyway, so
the cost does not depend on what ran before); `Plan.cost` counts them as sublayer masks (`Cost.add_sublayer_masks`:
half a block per kept sublayer), paid where the store did not hold them. The measurements go through the evaluation store and prefix
sharing like the game's.

Scores: the step at which each sublayer went, negated (never removed: 0, above every removed one).
"""

from __future__ import annotations

import math
import time

import numpy as np

from layershap.game.context import measurement_context
from layershap.game.layer_game import LayerGame
from layershap.game.measure import evaluate_masks
from layershap.game.store import open_store
from layershap.models.layers import num_layers
from layershap.plan.cost import Cost
from layershap.plan.methods._common import tokens_of
from layershap.plan.methods._sublayers import allowed_players, parameter_target, reaches, sublayer_plan_result


def blockpruner(model, windows, ratio: float, *, protect=(), batch_size: int = 8, store=None, **_):
    started = time.perf_counter()
    params, target = parameter_target(model, ratio)
    n = num_layers(model)
    allowed = allowed_players(n, protect)
    game = LayerGame(model, windows, batch_size=batch_size, granularity="sublayer")
    mask = np.ones(2 * n, dtype=bool)
    measured: dict[bytes, np.ndarray] = {}
    steps = []
    with open_store(model, store) as db:
        stored = set(db.all_nlls(measurement_context(game)))
        while not reaches(mask, params, target):
            candidates = [j for j in allowed if mask[j]]
            if mask.sum() <= 1 or not candidates:
                break  # drop_in_order's error below says why
            trials = np.repeat(mask[None], len(candidates), axis=0)
            trials[np.arange(len(candidates)), candidates] = False
            nlls, _, _ = evaluate_masks(game, db, trials, description=f"blockpruner step {len(steps) + 1}")
            measured.update((t.tobytes(), t) for t in trials)
            best = int(np.argmin(np.where(np.isfinite(nlls), nlls, np.inf)))
            mask[candidates[best]] = False
            steps.append({"removed": int(candidates[best]), "calibration_ppl": _ppl(float(nlls[best])),
                          "candidates": len(candidates)})
    if not reaches(mask, params, target):
        from layershap.plan.methods._sublayers import drop_in_order

        drop_in_order([], params, target, mask)  # raises: the allowed sublayers cannot reach the ratio
    scores = np.zeros(2 * n)
    for step, entry in enumerate(steps):
        scores[entry["removed"]] = -(len(steps) - step)
    details = {"steps": steps, "measured_calibration_ppl": steps[-1]["calibration_ppl"] if steps else None}
    cost = Cost()
    cost.add_sublayer_masks(list(measured.values()), int(tokens_of(windows).numel()), stored=stored)
    return sublayer_plan_result("blockpruner", model, mask, scores.tolist(), len(measured),
                                time.perf_counter() - started, details, cost)


def _ppl(nll: float) -> float:
    return math.exp(nll) if math.isfinite(nll) and nll < 700 else math.inf
