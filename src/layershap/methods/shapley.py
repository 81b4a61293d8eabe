"""The cooperative-game method: remove the blocks with the lowest Shapley values.

Values come from `layershap.estimate` (stratified masks -> stored evaluations -> surrogate -> Shapley). The
plan also records the surrogate's predicted calibration perplexity for the pruned model and the measured
one (one more real pass unless the store already has that mask).
"""

from __future__ import annotations

import math
import time

import numpy as np

from layershap.estimate import EstimateSettings, estimate, evaluate_masks
from layershap.game import LayerGame
from layershap.methods.base import Plan, lowest_scoring
from layershap.store import open_store


def shapley(model, windows, k: int, *, protect=(), seed: int = 0, batch_size: int = 8, store=None,
            settings: EstimateSettings | None = None, **_) -> Plan:
    started = time.perf_counter()
    settings = settings or EstimateSettings(seed=seed, target_removed=k)
    game = LayerGame(model, windows, utility=settings.utility, batch_size=batch_size)
    with open_store(model, store) as db:
        result = estimate(game, db, settings)
        remove = lowest_scoring(result.shapley, k, protect)
        mask = np.ones(game.n_players, dtype=bool)
        mask[remove] = False
        (measured_nll,), evaluated, _ = evaluate_masks(game, db, mask[None], description="checking the plan")
    predicted_nll = game.utility.nll_of(result.surrogate.predict(mask[None])[0], result.base_nll)
    details = {
        "estimate": result.to_dict(),
        "predicted_calibration_ppl": _ppl(predicted_nll),
        "measured_calibration_ppl": _ppl(measured_nll),
        "dense_calibration_ppl": _ppl(result.base_nll),
    }
    return Plan("shapley", game.n_players, remove, result.shapley.tolist(),
                forward_passes=result.evaluations + evaluated, seconds=time.perf_counter() - started,
                details=details)


def _ppl(nll: float) -> float:
    return math.exp(nll) if math.isfinite(nll) and nll < 700 else math.inf
