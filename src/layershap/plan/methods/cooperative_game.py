"""The cooperative-game method: blocks are players, and the plan comes from their Shapley values.

Values come from `layershap.estimate.pipeline` (stratified masks -> stored evaluations -> surrogate -> Shapley).
With `plan="lowest"` (the paper, and `--preset paper`) the k blocks with the lowest values are removed. With
`plan="search"` (the default) half the budget goes to the estimate and half to measuring, on the real model,
first the cheap baselines' plans (`layershap.plan.seeds`: ShortGPT and angular from one traced pass, leave-one-out
from the estimate's single removals), then the k-removal plans the surrogate rates best (its search seeded
with the lowest-value plan) and the swaps around the best plan measured so far, and last every plan one block
from the best and the swaps those measurements rate best, again around a better plan where the budget
allows (the polish); the best measured plan wins (`layershap.plan.refine`), and the reported values use every
mask measured. The record holds the surrogate's predicted and the measured calibration perplexity of the
chosen plan. With `--utility kl` the game measures the mean KL from the dense model instead: the record then
holds the predicted and measured calibration KL, and the calibration perplexities of the dense model and the
plan from a plain NLL pass of each (through the store, under the NLL's own context; like the held-out
perplexity, not part of the cost of choosing).

With `settings.confirm` rounds (and fresh windows given as `confirmation_windows`), the best measured plans
and the seed plans are finalists, and the plan kept is the one that wins successive halving on windows the
search never saw (`layershap.plan.confirm`); its cost is reserved from the budget before the search.

Cost (`Plan.cost`): every distinct mask the method relied on, at its kept blocks plus the head, used whether
measured now or served from the store, paid only when measured by this run; the traced pass of the seeds
counts as one full pass, and so does the dense model's KL reference (`--utility kl`).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from layershap.estimate.budget import mask_share
from layershap.estimate.pipeline import MIN_BUDGET, EstimateSettings, estimate, estimate_from_measurements
from layershap.game.context import measurement_context
from layershap.game.layer_game import LayerGame
from layershap.game.measure import evaluate_masks
from layershap.game.store import open_store
from layershap.plan.confirm import MEASURED_FINALISTS, confirmation_cost, finalists, successive_halving
from layershap.plan.methods._common import tokens_of
from layershap.plan.methods.base import Cost, Plan, lowest_scoring
from layershap.plan.refine import refine
from layershap.plan.seeds import leave_one_out_seed, one_pass_seeds


def shapley(model, windows, k: int, *, protect=(), seed: int = 0, batch_size: int = 8, store=None,
            settings: EstimateSettings | None = None, confirmation_windows=None, **_) -> Plan:
    started = time.perf_counter()
    settings = settings or EstimateSettings(seed=seed, target_removed=k)
    game = LayerGame(model, windows, utility=settings.utility, batch_size=batch_size)
    n, tokens = game.n_players, int(tokens_of(windows).numel())
    cost, confirmation, candidates = Cost(), None, []
    with open_store(model, store) as db:
        settings.check(n)
        stored = set(db.all_nlls(measurement_context(game)))
        traced, seeds = 0, []
        reference = 1 if game.loss == "kl" else 0  # the dense model's reference pass, reserved like the trace
        if settings.plan == "search":
            first = estimate(game, db, replace(settings, budget=max(MIN_BUDGET, settings.budget // 2)))
            seeds = one_pass_seeds(model, windows, k, protect=protect, batch_size=batch_size)
            traced = 1 if seeds else 0
            loo_plan = leave_one_out_seed(first.masks, first.nlls, k, protect=protect)
            seeds += [loo_plan] if loo_plan is not None and loo_plan not in seeds else []
            confirming = settings.confirm > 0 and confirmation_windows is not None and k > 0
            reserve = (math.ceil(confirmation_cost(MEASURED_FINALISTS + len(seeds), settings.confirm, n, k,
                                                   reference=bool(reference)))
                       if confirming else 0)
            refined = refine(game, db, first.masks, first.nlls, k=k,
                             budget=settings.budget - traced - reserve - reference,
                             surrogate=settings.surrogate, seed=settings.seed, protect=protect,
                             start=[lowest_scoring(first.shapley, k, protect)], seeds=seeds,
                             share=mask_share(n, settings.budget_unit))
            result = estimate_from_measurements(game.utility, refined.masks, refined.nlls, settings)
            result.evaluations, result.reused = first.evaluations + refined.evaluations, first.reused
            best = refined.best
            if k > 0:  # also what a later stage may judge again (after a repair): the best measured plans, seeds
                candidates = finalists(refined.masks, refined.nlls, k, protect, result.base_nll, seeds)
            if confirming and best is not None:
                confirmation = successive_halving(model, confirmation_windows, candidates, db,
                                                  samples=windows.samples, utility=settings.utility,
                                                  batch_size=batch_size)
                screened, best = best, confirmation.winner
            remove = (list(np.flatnonzero(~best)) if best is not None else lowest_scoring(result.shapley, k, protect))
            used = refined.masks
        else:
            result = estimate(game, db, settings)
            remove = lowest_scoring(result.shapley, k, protect)
            used = result.masks
        mask = np.ones(n, dtype=bool)
        mask[remove] = False
        (measured_nll,), _, _ = evaluate_masks(game, db, mask[None], description="checking the plan")
        if reference:
            plain = LayerGame(model, windows, utility="neg_nll", batch_size=batch_size)
            (dense_nll, plan_nll), _, _ = evaluate_masks(plain, db, np.stack([np.ones(n, dtype=bool), mask]),
                                                         description="calibration perplexity")
    cost.add_masks(list({m.tobytes(): m for m in [*used, mask]}.values()), tokens, stored=stored)
    if traced:
        cost.add(tokens, n + 1)
    if reference:  # used whether or not this run measured it; paid only if it did
        cost.add(tokens, n + 1, paid=game.reference_passes > 0)
    if confirmation is not None:
        cost.include(confirmation.cost)
    predicted_nll = game.utility.nll_of(result.surrogate.predict(mask[None])[0], result.base_nll)
    details = {
        "estimate": result.to_dict(),
        "plan": settings.plan,
        "seed_plans": seeds,
    }
    if candidates:
        details["finalists"] = [[int(i) for i in np.flatnonzero(~c)] for c in candidates]
        measured_nlls = {m.tobytes(): float(v) for m, v in zip(refined.masks, refined.nlls)}
        details["finalist_nlls"] = [measured_nlls.get(c.tobytes()) for c in candidates]  # calibration windows
    if reference:  # the game's loss is a KL: no perplexity of it; the perplexities from plain NLL passes
        details.update({"loss": game.loss_name, "predicted_calibration_kl": predicted_nll,
                        "measured_calibration_kl": measured_nll, "measured_calibration_ppl": _ppl(plan_nll),
                        "dense_calibration_ppl": _ppl(dense_nll)})
    else:
        details.update({"predicted_calibration_ppl": _ppl(predicted_nll),
                        "measured_calibration_ppl": _ppl(measured_nll),
                        "dense_calibration_ppl": _ppl(result.base_nll)})
    if confirmation is not None:
        details["confirmation"] = {**confirmation.to_dict(), "reserved_full_passes": reserve,
                                   "screening_choice": [int(i) for i in np.flatnonzero(~screened)],
                                   "windows": confirmation_windows.describe()}
    elif settings.plan == "search" and settings.confirm > 0:
        details["confirmation"] = {"skipped": "no fresh calibration windows (the calibration half has no room "
                                              "for them) or nothing to choose from"}
    return Plan("shapley", n, [int(i) for i in remove], result.shapley.tolist(), forward_passes=cost.passes,
                seconds=time.perf_counter() - started, details=details, cost=cost)


def _ppl(nll: float) -> float:
    return math.exp(nll) if math.isfinite(nll) and nll < 700 else math.inf
