"""Plans over 2n players (attn.i, mlp.i): remove sublayers whose parameters add up to at least r of the blocks'.

A sublayer plan is not a fixed count of removals: an attention of SmolLM2 holds a third of its MLP's
parameters, so the constraint is on parameters (`removed_parameters >= ratio * block_parameters`). The plan:

1. the block plan of the same parameter ratio (the block method, by default `shapley`, at the fewest blocks
   whose parameters reach r; its masks stay in the store for the block game), measured as a sublayer mask;
2. half the budget on the sublayer game's estimate (stratified masks around the block plan's 2k removals),
   surrogate, Shapley values of the 2n players;
3. the other half on rounds as in `refine.py`: refit the surrogate on all measured masks, measure the best
   predicted unmeasured feasible plans among single exchanges around the best measured plan and the
   surrogate's hill climbs from the start plans (the block plan, the lowest values per parameter, the lowest
   attentions first);
4. the best *measured* feasible plan wins, so it is never worse on calibration than the block plan.

One `--budget` pays for the whole plan (`split_budget`): a block method that spends the budget (`shapley` and
the shapiq estimators) gets half of it for the block plan, the sublayer game the other half; a block method
that spends none (shortgpt, last, ...) leaves it all to the sublayer game. The half is not a measured optimum:
it keeps a run at `--budget 2B` the same as the earlier runs that spent B in each game. The sublayer game's
share is spent in the unit of `--budget` (`estimate/budget.py`: a mask is charged its kept share of a full
pass, a sublayer half a block; or 1 per mask with `budget_unit="masks"`), as the block search spends it.

Cost (`Plan.cost`, `plan/cost.py`): the block plan's own cost (its block game's masks, used and paid as that
method counts them) plus every distinct sublayer mask the search relied on, each one pass of tokens x (kept
sublayers / 2 + 1) token-passes: an attention or an MLP sublayer is half a block, the head one block. Used
whether measured now or served from the store, paid only when this run measured it. `forward_passes` is the
used passes, as for the block methods.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace

import numpy as np

from layershap.errors import LayershapError
from layershap.estimate.budget import SPENT_TOLERANCE, mask_share, spent
from layershap.estimate.pipeline import MIN_BUDGET, EstimateSettings, estimate, estimate_from_measurements
from layershap.estimate.surrogate import make_surrogate
from layershap.game.context import measurement_context
from layershap.game.layer_game import LayerGame, bounded_nll
from layershap.game.measure import evaluate_masks
from layershap.game.store import open_store
from layershap.models.layers import num_layers
from layershap.models.sublayers import (
    block_parameters,
    kv_cache_fraction_removed,
    sublayer_names,
    sublayer_parameters,
)
from layershap.plan.cost import Cost
from layershap.plan.methods import select_layers
from layershap.plan.methods._common import tokens_of
from layershap.plan.methods.base import Plan
from layershap.plan.methods.blockpruner import blockpruner
from layershap.plan.methods.llm_drop import llm_drop
from layershap.plan.ratio import check_ratio


def blocks_for_parameter_ratio(ratio: float, n: int) -> int:
    """The fewest whole blocks whose parameters reach r of all blocks' (blocks of one model are alike)."""
    check_ratio(ratio)
    k = math.ceil(ratio * n - 1e-9)
    if k >= n:
        raise LayershapError(f"--ratio {ratio} would remove all {n} blocks; use a smaller ratio")
    return max(k, 1)


# Block methods that spend `--budget` (the others run a fixed number of passes).
BUDGETED_BLOCK_METHODS = ("shapley", "kernelshap", "permutation", "stratified", "svarm", "kadd")


def split_budget(budget: int, block_method: str, block_share: float = 0.5) -> tuple[int, int]:
    """(block plan's budget, sublayer game's budget) out of one `--budget`, `block_share` of it for the block
    plan (half by default; benchmarks/sublayers.py --block-shares measures others); refuses, in one line, a
    budget too small for both parts to reach the surrogate's minimum."""
    block = int(budget * block_share) if block_method in BUDGETED_BLOCK_METHODS else 0
    sublayer = budget - block
    if (block and block < MIN_BUDGET) or sublayer < MIN_BUDGET:
        need = 2 * MIN_BUDGET if block_method in BUDGETED_BLOCK_METHODS else MIN_BUDGET
        raise LayershapError(f"--budget {budget} is too small for --granularity sublayer: it is split between the "
                             f"block plan and the sublayer game, each needing at least {MIN_BUDGET}; give at "
                             f"least {need}")
    return block, sublayer


def sublayer_mask_of_blocks(n: int, remove) -> np.ndarray:
    mask = np.ones((n, 2), dtype=bool)
    mask[list(remove)] = False
    return mask.reshape(-1)


def sublayer_plan(model, windows, ratio: float, *, settings: EstimateSettings | None = None, store=None,
                  batch_size: int = 8, seed: int = 0, protect=(), block_method: str = "shapley",
                  block_share: float = 0.5, **_) -> Plan:
    """The sublayer plan (see the module doc); `Plan.remove` holds player indices (2i: attn.i, 2i+1: mlp.i)."""
    started = time.perf_counter()
    settings = settings or EstimateSettings(seed=seed)
    n = num_layers(model)
    params = sublayer_parameters(model)
    target = ratio * block_parameters(model)
    allowed = np.array([j for j in range(2 * n) if j // 2 not in set(protect)])
    k_block = blocks_for_parameter_ratio(ratio, n)
    block_budget, budget = split_budget(settings.budget, block_method, block_share)
    block = select_layers(block_method, model, windows, k_block, protect=protect, seed=seed, batch_size=batch_size,
                          store=store, settings=replace(settings, target_removed=k_block,
                                                        budget=block_budget or settings.budget))
    block_mask = sublayer_mask_of_blocks(n, block.remove)
    game = LayerGame(model, windows, utility=settings.utility, batch_size=batch_size, granularity="sublayer")
    with open_store(model, store) as db:
        stored = set(db.all_nlls(measurement_context(game)))
        first = estimate(game, db, replace(settings, budget=max(MIN_BUDGET, budget // 2),
                                           target_removed=2 * k_block))
        masks, nlls = first.masks, first.nlls
        base = float(first.base_nll)
        starts = [block_mask, *_value_plans(first.shapley, params, target, allowed)]
        evaluations = first.evaluations
        (seed_nlls, evaluated, _) = evaluate_masks(game, db, np.array(starts), description="measuring start plans")
        masks, nlls = np.concatenate([masks, starts]), np.concatenate([nlls, seed_nlls])
        evaluations += evaluated
        per_round = max(4, budget // 16)
        share = mask_share(n, settings.budget_unit)
        rounds = 0
        while (left := budget - spent(_distinct(masks), share)) > SPENT_TOLERANCE:
            utilities = np.array([game.utility(v, base) for v in nlls])
            surrogate = make_surrogate(settings.surrogate, 2 * n, settings.seed).fit(masks, utilities)
            best = best_feasible(masks, nlls, params, target, base)
            pool = [*exchanges(best, params, target, allowed)]
            pool += [climb(surrogate.predict, s, params, target, allowed) for s in [best, *starts]]
            seen = {m.tobytes() for m in masks}
            fresh = list({m.tobytes(): m for m in pool if m.tobytes() not in seen}.values())
            if not fresh:
                break
            order = np.argsort(-surrogate.predict(np.array(fresh)), kind="stable")
            candidates = _affordable([fresh[i] for i in order], share, left, per_round)
            if not len(candidates):
                break
            new, evaluated, _ = evaluate_masks(game, db, candidates, description=f"sublayer plans (round {rounds + 1})")
            masks, nlls = np.concatenate([masks, candidates]), np.concatenate([nlls, new])
            evaluations += evaluated
            rounds += 1
        best = best_feasible(masks, nlls, params, target, base)
        result = estimate_from_measurements(game.utility, masks, nlls, settings)
    nll_of = {m.tobytes(): float(v) for m, v in zip(masks, nlls)}
    distinct = _distinct(masks)
    cost = Cost()
    cost.include(block.cost)
    cost.add_sublayer_masks(distinct, int(tokens_of(windows).numel()), stored=stored)
    remove = [int(j) for j in np.flatnonzero(~best)]
    names = sublayer_names(n)
    details = {
        "granularity": "sublayer",
        "removed_sublayers": [names[j] for j in remove],
        "parameters_removed": int(params[~best].sum()),
        "parameter_fraction_removed": float(params[~best].sum() / block_parameters(model)),
        "kv_cache_fraction_removed": kv_cache_fraction_removed(best),
        "block_plan": {"method": block_method, "removed": block.remove,
                       "measured_calibration_ppl": _ppl(nll_of[block_mask.tobytes()]),
                       "forward_passes": block.forward_passes,
                       "cost": asdict(block.cost),
                       "masks_used": block.details.get("estimate", {}).get("masks", block.forward_passes)},
        "masks_used": len(distinct),
        "sublayer_masks_paid": evaluations,
        "budget_split": {"block_plan": block_budget, "sublayer_game": budget},
        "sublayer_budget_spent": spent(distinct, share),
        "measured_calibration_ppl": _ppl(nll_of[best.tobytes()]),
        "dense_calibration_ppl": _ppl(base),
        "rounds": rounds,
        "shapley": dict(zip(names, result.shapley.tolist())),
    }
    return Plan(f"{block_method}-sublayer", 2 * n, remove, result.shapley.tolist(),
                forward_passes=cost.passes, seconds=time.perf_counter() - started, details=details, cost=cost)


# The sublayer methods, registered by name: `(model, windows, ratio, **options) -> Plan` whose `remove` holds
# player indices (2i: attn.i, 2i+1: mlp.i). `compare --granularity sublayer` runs these; a block method named
# there runs at the fewest blocks whose parameters reach the ratio.
SUBLAYER_METHODS = {
    "shapley": sublayer_plan,
    "blockpruner": blockpruner,
    "llmdrop": llm_drop,
}


def select_sublayers(method: str, model, windows, ratio: float, **options) -> Plan:
    """Run a registered sublayer method: which sublayers to remove for a parameter ratio. A plan without a
    `cost` gets one from its forward passes, each counted as a pass of the full model (marked `estimated`)."""
    if method not in SUBLAYER_METHODS:
        raise LayershapError(f"unknown sublayer method {method!r}; use one of {', '.join(SUBLAYER_METHODS)}")
    plan = SUBLAYER_METHODS[method](model, windows, ratio, **options)
    if plan.cost is None:
        plan.cost = Cost.full_passes(plan.forward_passes, int(tokens_of(windows).numel()), num_layers(model),
                                     estimated=plan.forward_passes > 0)
    return plan


def feasible(masks: np.ndarray, params: np.ndarray, target: float) -> np.ndarray:
    masks = np.atleast_2d(masks)
    return (~masks).astype(np.int64) @ params >= target - 1e-6


def best_feasible(masks, nlls, params, target, base_nll) -> np.ndarray:
    ok = feasible(masks, params, target)
    if not ok.any():
        raise LayershapError("no measured sublayer plan removes enough parameters")
    scores = np.array([bounded_nll(v, base_nll) for v in nlls])
    index = np.flatnonzero(ok)[np.argmin(scores[ok])]
    return masks[index].copy()


def exchanges(mask: np.ndarray, params: np.ndarray, target: float, allowed: np.ndarray) -> list[np.ndarray]:
    """Feasible plans one move away: a removed sublayer kept again (alone, or for one kept sublayer removed)."""
    removed, kept = allowed[~mask[allowed]], allowed[mask[allowed]]
    have = float(params[~mask].sum())
    ok = target - 1e-6
    backs = [(i, None) for i in removed if have - params[i] >= ok]
    swaps = [(i, j) for i in removed for j in kept if have - params[i] + params[j] >= ok]
    out = np.repeat(mask[None], len(backs) + len(swaps), axis=0)
    for row, (i, j) in enumerate(backs + swaps):
        out[row, i] = True
        if j is not None:
            out[row, j] = False
    return list(out)


def climb(predict, mask: np.ndarray, params, target, allowed, max_rounds: int = 50) -> np.ndarray:
    """Take the best-predicted move while the prediction improves."""
    best, score = mask.copy(), float(predict(mask[None])[0])
    for _ in range(max_rounds):
        moves = exchanges(best, params, target, allowed)
        if not moves:
            break
        scores = predict(np.array(moves))
        top = int(np.argmax(scores))
        if scores[top] <= score + 1e-12:
            break
        best, score = moves[top], float(scores[top])
    return best


def _distinct(masks) -> list[np.ndarray]:
    return list({m.tobytes(): m for m in masks}.values())


def _affordable(ranked, share, left: float, most: int) -> np.ndarray:
    """The best-ranked masks, at most `most` of them, whose charges fit in what is left of the budget."""
    chosen = []
    for mask in ranked:
        if len(chosen) == most:
            break
        if share(mask) <= left + SPENT_TOLERANCE:
            chosen.append(mask)
            left -= share(mask)
    return np.array(chosen, dtype=bool)


def _value_plans(values, params, target, allowed) -> list[np.ndarray]:
    """Plans read off the values: the lowest value per parameter first, and attentions (lowest first) before
    any MLP (LLM-Drop's observation that attention is the cheaper half), each until the target is reached."""
    values = np.asarray(values, dtype=float)
    orders = [sorted(allowed, key=lambda j: values[j] / max(params[j], 1)),
              sorted(allowed, key=lambda j: (j % 2, values[j]))]
    plans = []
    for order in orders:
        mask = np.ones(len(values), dtype=bool)
        for j in order:
            if feasible(mask, params, target)[0]:
                break
            mask[j] = False
        if feasible(mask, params, target)[0]:
            plans.append(mask)
    return plans


def _ppl(nll: float) -> float:
    return math.exp(nll) if math.isfinite(nll) and nll < 700 else math.inf
