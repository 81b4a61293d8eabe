"""Spend the rest of the budget where the decision is made: on the best k-removal plans the surrogate sees.

After the stratified estimate, the seed plans (the one-pass baselines' choices, `seeds.py`) are measured
first. Then each round refits the surrogate on everything measured so far and measures, on the real model,
the most promising unmeasured plans from two places: the surrogate's own best k-removal plans
(`search.py`), and the single swaps around the best plan measured so far, ranked by the surrogate (a local
search on the real model, which finds what the sampled masks never came near). Rounds repeat until the
budget is spent, but for a last step (the polish) that measures every plan one block more or one block
fewer than the best plan and the swaps those first-order differences rate best, again around a better plan
it finds where the budget holds that. The plan returned is the best *measured* one, so a surrogate error
can cost quality only through what was not tried, never through what is chosen.
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

    polish = _polish_reserve(_polish_cost(n, k, protect, share, plan_share),
                             POLISH_MAX_SHARE * (budget - spent(masks, share)))

    def affordable(reserve: float) -> int:
        left = budget - reserve - spent(masks, share)
        return max(0, math.floor((left + SPENT_TOLERANCE) / plan_share))

    first = list({m.tobytes(): m for m in (removal_mask(n, s) for s in seeds)
                  if m.tobytes() not in seen}.values())[:affordable(polish)]

    def spend_rounds(reserve: float) -> None:
        """Surrogate rounds until what is left beyond `reserve` buys no plan (or nothing is left to try)."""
        nonlocal masks, nlls, evaluations, rounds, first
        while affordable(reserve) > 0:
            if first:
                candidates, first = first, []
            else:
                utilities = np.array([game.utility(v, base) for v in nlls])
                model = make_surrogate(surrogate, n, seed).fit(masks, utilities)
                wanted = min(per_round, affordable(reserve))
                best = best_measured(masks, nlls, k, protect, base)
                near = _unmeasured_neighbours(model.predict, masks, best, protect, wanted=(wanted + 1) // 2)
                far = _unmeasured_top_plans(model.predict, np.concatenate([masks, *[m[None] for m in near]]), n,
                                            k, protect, start, wanted=wanted - len(near))
                candidates = near + far
            if not candidates:
                break
            new, evaluated, _ = evaluate_masks(game, store, np.array(candidates),
                                               description=f"refining (round {rounds + 1})")
            masks = np.concatenate([masks, np.array(candidates)])
            nlls = np.concatenate([nlls, new])
            evaluations += evaluated
            rounds += 1

    spend_rounds(polish)
    best = best_measured(masks, nlls, k, protect, base)
    if polish and best is not None:
        masks, nlls, evaluated = _polish(game, store, masks, nlls, best, k, protect, base,
                                         left=lambda m: budget - spent(m, share), share=share, plan_share=plan_share)
        evaluations += evaluated
    if polish:
        # what the polish could not use (nothing left to try near its best, or no measured plan to start
        # from) goes back to the rounds, so the reserve is never left unspent
        spend_rounds(0.0)
        best = best_measured(masks, nlls, k, protect, base)
    return Refinement(masks, nlls, best, evaluations, rounds)


# The last step measures, around the best plan, every plan with one block more removed and every plan with
# one block restored (SLEB's trials, but from the best plan), and then, POLISH_SWAPS at a time, the swaps
# these first-order differences rate best; when a swap beats the best plan, it starts again around the new
# one. Its reserve holds POLISH_ROUNDS such starts (probes and a first batch of swaps) and at most
# POLISH_MAX_SHARE of what the refinement has to spend; what a start that finds nothing better leaves of the
# reserve buys the next-rated swaps.
POLISH_SWAPS = 4
POLISH_ROUNDS = 2
POLISH_MAX_SHARE = 0.5


def _polish_reserve(one: float, room: float) -> float:
    """The budget kept back for the polish: as many of POLISH_ROUNDS starts (each costing `one`) as fit in
    `room`, or 0 (no polish) when not even one does."""
    if one <= 0:
        return 0.0
    starts = min(POLISH_ROUNDS, math.floor((room + SPENT_TOLERANCE) / one))
    return max(0, starts) * one  # room is negative when the estimate already spent the budget


def _probes(best: np.ndarray, protect) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(blocks kept, blocks removed, the plans with one more removed, the plans with one restored)."""
    allowed = allowed_blocks(len(best), protect)
    kept, removed = allowed[best[allowed]], allowed[~best[allowed]]
    more = np.repeat(best[None], len(kept), axis=0)
    more[np.arange(len(kept)), kept] = False
    fewer = np.repeat(best[None], len(removed), axis=0)
    fewer[np.arange(len(removed)), removed] = True
    return kept, removed, more, fewer


def _probes_cost(best: np.ndarray, protect, share) -> float:
    _, _, more, fewer = _probes(best, protect)
    return spent([*more, *fewer], share)


def _polish_cost(n: int, k: int, protect, share, plan_share: float) -> float:
    """What the polish will spend on a plan removing k of n blocks (its probes and swaps), or 0 when there is
    nothing to polish (no block to remove or restore)."""
    if k == 0 or k >= len(allowed_blocks(n, protect)):
        return 0.0
    return _probes_cost(removal_mask(n, list(allowed_blocks(n, protect)[:k])), protect, share) + POLISH_SWAPS * plan_share


def first_order_swaps(best, kept, removed, remove_cost, restore_cost, *, measured=()) -> list[np.ndarray]:
    """The unmeasured swaps of `best` (restore removed[j], remove kept[i]), lowest first-order estimate
    remove_cost[i] + restore_cost[j] first."""
    estimates = []
    for i, b in enumerate(kept):
        for j, r in enumerate(removed):
            swap = best.copy()
            swap[[b, r]] = [False, True]
            if swap.tobytes() not in measured:
                estimates.append((remove_cost[i] + restore_cost[j], len(estimates), swap))
    return [swap for *_, swap in sorted(estimates, key=lambda item: item[:2])]


def _polish(game, store, masks, nlls, best, k, protect, base, *, left, share, plan_share):
    """Local search on the real model from `best`, paid from what `left(masks)` says is left of the budget.

    Around a centre plan it measures the probes (one block more removed, one restored), then the unmeasured
    swaps with the lowest first-order estimate, POLISH_SWAPS at a time: nll(centre) + (nll with b also
    removed - nll(centre)) + (nll with r restored - nll(centre)) for the swap that restores r and removes b.
    When a measured swap beats the centre it becomes the new centre (if its probes still fit); otherwise the
    next-rated swaps are measured, until the budget is spent. Why: a surrogate fitted mostly on other masks
    can rate a swap low whose two halves are each cheap once the rest of the plan is gone (at k = 10 on the
    default model it never tried restoring 25 and removing 4, SLEB's plan, 1.7% better on the same windows);
    and one polish can end one swap short (at k = 8 it twice found a better plan whose own best swap was
    SLEB's plan)."""
    known = {m.tobytes(): float(v) for m, v in zip(masks, nlls, strict=True)}
    evaluated, probed, centre = 0, set(), best

    def measure(candidates, description):
        nonlocal masks, nlls, evaluated
        candidates = np.array(candidates)
        new, count, _ = evaluate_masks(game, store, candidates, description=description)
        fresh = [i for i, m in enumerate(candidates) if m.tobytes() not in known]
        masks = np.concatenate([masks, candidates[fresh]])
        nlls = np.concatenate([nlls, np.asarray(new, dtype=float)[fresh]])
        known.update({m.tobytes(): float(v) for m, v in zip(candidates, new, strict=True)})
        evaluated += count

    while True:
        kept, removed, more, fewer = _probes(centre, protect)
        if centre.tobytes() not in probed:
            missing = [m for m in (*more, *fewer) if m.tobytes() not in known]
            if spent(missing, share) + plan_share > left(masks) + SPENT_TOLERANCE:
                break  # a centre without its probes has no first-order estimates
            if missing:
                measure(missing, "polishing")
            probed.add(centre.tobytes())
        room = math.floor((left(masks) + SPENT_TOLERANCE) / plan_share)
        mid = bounded_nll(known[centre.tobytes()], base)
        remove_cost = [bounded_nll(known[m.tobytes()], base) - mid for m in more]
        restore_cost = [bounded_nll(known[m.tobytes()], base) - mid for m in fewer]
        chosen = first_order_swaps(centre, kept, removed, remove_cost, restore_cost,
                                   measured=known)[:min(POLISH_SWAPS, room)]
        if not chosen:
            break
        measure(chosen, "polishing (swaps)")
        centre = best_measured(masks, nlls, k, protect, base)
    return masks, nlls, evaluated


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
