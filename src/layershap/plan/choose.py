"""The plan stage of `prune`: which blocks (or sublayers) go, and taking them out of the model.

`PlanRequest` is everything the stage needs besides the model and the calibration windows, checked before any
forward pass (`plan_request`), so that a bad `--protect` or a plan made for another model is refused before
minutes of held-out perplexity are spent. `choose_plan` turns it into a `Plan` (from a method, the sublayer
game, or an earlier run's record given with `--plan`), and `apply_plan` removes what the plan names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from layershap.errors import LayershapError
from layershap.game.layer_game import check_granularity
from layershap.models.layers import normalise_layer_list, num_layers, prune_layers
from layershap.plan.methods import select_layers
from layershap.plan.methods.base import Plan
from layershap.plan.ratio import layers_to_remove
from layershap.plan.saved import plan_from_record, read_plan


@dataclass(frozen=True)
class PlanRequest:
    """What to choose.

    k: blocks to remove (a sublayer plan removes a share of parameters, `ratio`, instead).
    saved: the record of an earlier prune (`--plan`): its blocks are removed without choosing again, and
        `method`, `ratio` and `protect` are the ones it recorded.
    settings, store: the Shapley method's settings (`EstimateSettings`) and evaluation store; every method
        receives them and the ones that evaluate masks use them.
    """

    method: str
    n_layers: int
    k: int
    ratio: float | None
    protect: list[int]
    granularity: str = "block"
    seed: int = 0
    batch_size: int = 8
    settings: object = None
    store: object = None
    saved: dict | None = None


def plan_request(model, *, method: str, ratio: float | None, protect=(), granularity: str = "block",
                 plan_file=None, seed: int = 0, batch_size: int = 8, settings=None, store=None) -> PlanRequest:
    """The checked request: granularity, the earlier plan (`plan_file`) against this model, and that the
    protected blocks leave enough to choose from."""
    check_granularity(granularity)
    if granularity == "sublayer":
        from layershap.estimate.pipeline import check_sublayer_plan_utility
        from layershap.models.sublayers import check_sublayers

        check_sublayers(model)
        if plan_file is not None:
            raise LayershapError("--plan takes whole blocks; drop --granularity sublayer")
        if getattr(settings, "confirm", 0):
            raise LayershapError("--confirm re-measures the block search's finalists on fresh windows; the sublayer "
                                 "search has no such step yet: drop --confirm, or use --granularity block")
        check_sublayer_plan_utility(settings)
        if settings is not None and plan_file is None:
            from layershap.plan.sublayer import split_budget

            split_budget(settings.budget, method)
    n = num_layers(model)
    saved = read_plan(plan_file, model, n, ratio) if plan_file is not None else None
    if saved is not None:
        k = len(saved["removed"])
        ratio, method, protect = saved.get("ratio", k / n), saved.get("method", "plan"), saved.get("protect", [])
    else:
        k = layers_to_remove(ratio, n)
    protected = normalise_layer_list(protect, n)
    if n - len(protected) < k:
        raise LayershapError(f"--protect keeps {len(protected)} of {n} blocks, leaving {n - len(protected)} "
                             f"to choose {k} from; protect fewer blocks or lower --ratio")
    return PlanRequest(method=method, n_layers=n, k=k, ratio=ratio, protect=protected, granularity=granularity,
                       seed=seed, batch_size=batch_size, settings=settings, store=store, saved=saved)


def choose_plan(model, calibration, request: PlanRequest, *, confirmation=None) -> Plan:
    """The plan, with `seconds` the time spent choosing it. `confirmation`: fresh calibration windows for the
    Shapley method's `--confirm` (`plan/confirm.py`)."""
    started = time.perf_counter()
    options = {"protect": request.protect, "seed": request.seed, "batch_size": request.batch_size,
               "settings": request.settings, "store": request.store}
    if confirmation is not None:
        options["confirmation_windows"] = confirmation
    if request.saved is not None:
        plan = plan_from_record(request.saved, request.n_layers)
    elif request.granularity == "sublayer":
        from layershap.plan.sublayer import sublayer_plan

        plan = sublayer_plan(model, calibration, request.ratio, block_method=request.method, **options)
    else:
        plan = select_layers(request.method, model, calibration, request.k, **options)
    plan.seconds = time.perf_counter() - started
    return plan


def apply_plan(model, plan: Plan, granularity: str = "block") -> None:
    """Remove the plan's blocks (or, for a sublayer plan, its attention and MLP sublayers) in place."""
    if granularity == "sublayer":
        from layershap.models.sublayers import remove_sublayers

        mask = np.ones(2 * num_layers(model), dtype=bool)
        mask[plan.remove] = False
        remove_sublayers(model, mask)
    else:
        prune_layers(model, plan.remove)
