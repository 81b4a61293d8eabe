"""Spend the rest of the budget where the decision is made: on the best k-removal plans the surrogate sees.

After the stratified estimate, the seed plans (the one-pass baselines' choices, `seeds.py`) are measured
first. Then each round refits the surrogate on everything measured so far and measures, on the real model,
the most promising unmeasured plans from two places: the surrogate's own best k-removal plans
(`search.py`), and the single swaps around the best plan measured so far, ranked by the surrogate (a local
search on the real model, which finds what the sampled masks never came near). Rounds repeat until the
budget is spent. The plan returned is the best *measured* one, so a surrogate error can cost quality only
through what was not tried, never through what is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from layershap.estimate.budget import SPENT_TOLERANCE, spent
from layershap.estimate.surrogate import make_surrogate
from layershap.game.layer_game import LayerGame, bounded_nll
from layershap.game.measure import evaluate_masks
from layershap.game.store import EvaluationStore
from layershap.plan.search import allowed_blocks, removal_mask, single_swaps, top_removal_masks


@dataclass
class Refinement:
    masks: np.ndarray
    nlls: np.ndarray
    best: np.ndarray
    evaluations: int
    rounds: int


def refine(game: LayerGame, store: EvaluationStore, masks: np.ndarray, nlls: np.ndarray, *, k: int,
           budget: float, surrogate: str, seed: int, protect=(), start=(), seeds=(),
           per_round: int | None = None, share: Callable[[np.ndarray], float] | None = None) -> Refinement:
    """Grow (masks, nlls) until they have spent `budget` with surrogate-chosen k-removal plans and pick the
    best measured.

    start: removal sets the surrogate search also polishes (e.g. the k lowest Shapley values);
    seeds: removal sets measured on the real model before the first round, whatever the surrogate thinks;
    share: what one mask costs against the budget (`estimate/budget.py`); by default 1, a budget of masks.
    """
    n = game.n_players
    share = share or (lambda mask: 1.0)
    plan_share = share(removal_mask(n, list(range(k))))  # every candidate removes exactly k players
    base = float(nlls[masks.all(axis=1)][0])
    per_round = per_round or max(4, int(budget) // 16)
    evaluations = rounds = 0
    masks, nlls = np.asarray(masks, dtype=bool), np.asarray(nlls, dtype=float)
    seen = {m.tobytes() for m in masks}

    def affordable() -> int:
        left = budget - spent(masks, share)
        return max(0, math.floor((left + SPENT_TOLERANCE) / plan_share))

    first = list({m.tobytes(): m for m in (removal_mask(n, s) for s in seeds)
                  if m.tobytes() not in seen}.values())[:affordable()]
    while affordable() > 0:
        if first:
            candidates, first = first, []
        else:
            utilities = np.array([game.utility(v, base) for v in nlls])
            model = make_surrogate(surrogate, n, seed).fit(masks, utilities)
            wanted = min(per_round, affordable())
            best = best_measured(masks, nlls, k, protect, base)
            near = _unmeasured_neighbours(model.predict, masks, best, protect, wanted=(wanted + 1) // 2)
            far = _unmeasured_top_plans(model.predict, np.concatenate([masks, *[m[None] for m in near]]), n, k,
                                        protect, start, wanted=wanted - len(near))
            candidates = near + far
        if not candidates:
            break
        new, evaluated, _ = evaluate_masks(game, store, np.array(candidates), description=f"refining (round {rounds + 1})")
        masks = np.concatenate([masks, np.array(candidates)])
        nlls = np.concatenate([nlls, new])
        evaluations += evaluated
        rounds += 1
    return Refinement(masks, nlls, best_measured(masks, nlls, k, protect, base), evaluations, rounds)


def _unmeasured_top_plans(predict, masks, n, k, protect, start, *, wanted: int) -> list[np.ndarray]:
    """The best-predicted k-removal plans not measured yet; the beam widens until enough are found (the
    top of a narrow beam is soon all measured, and the budget should still be spent near the optimum)."""
    seen = {m.tobytes() for m in masks}
    beam, found = 16, []
    while beam <= 1024:
        ranked = top_removal_masks(predict, n, k, protect=protect, beam=beam, count=beam + len(start) + wanted,
                                   start=start)
        found = [c for c in ranked if c.tobytes() not in seen][:wanted]
        if len(found) == wanted:
            break
        beam *= 4
    return found


def _unmeasured_neighbours(predict, masks, best, protect, *, wanted: int) -> list[np.ndarray]:
    """The unmeasured plans one swap (a removed block kept, a kept block removed) away from `best`, best
    predicted first."""
    if best is None or wanted <= 0:
        return []
    allowed = allowed_blocks(len(best), protect)
    seen = {m.tobytes() for m in masks}
    fresh = np.array([m for m in single_swaps(best, allowed) if m.tobytes() not in seen])
    if len(fresh) == 0:
        return []
    order = np.argsort(-predict(fresh), kind="stable")
    return [fresh[i] for i in order[:wanted]]


def best_measured(masks: np.ndarray, nlls: np.ndarray, k: int, protect, base_nll: float) -> np.ndarray | None:
    """The measured mask removing exactly k unprotected blocks with the lowest NLL (None if there is none)."""
    n = masks.shape[1]
    eligible = masks.sum(axis=1) == n - k
    for p in protect:
        eligible &= masks[:, p]
    if not eligible.any():
        return None
    scores = np.array([bounded_nll(v, base_nll) for v in nlls])
    index = np.flatnonzero(eligible)[np.argmin(scores[eligible])]
    return masks[index]
