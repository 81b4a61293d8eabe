"""Choose the plan for the repaired model: the search's finalists judged after their repair.

The blocks cheapest to lose before a repair need not be the cheapest after it: a cut whose damage is mostly a
change of magnitude is nearly free once rescaled, while one that changes the stream's direction is not. The
Shapley search already measured many plans; its finalists (the best measured plans and the rivals' seed plans,
`plan/confirm.py`'s `finalists`) are refitted with the repair and measured again on the calibration windows,
and the best repaired one is kept.

Judged on the windows the search measured them on, so that every finalist is compared on the same tokens as
before (the screening NLL beside the repaired one shows how much the ranking moved); each finalist's repair is
fitted on those windows too (a scale per cut has one number to fit, so fitting and judging on the same
windows flatters no finalist more than another), and the chosen plan's repair is then fitted again on the
repair windows. The dense model's streams are traced once for all finalists, and each finalist's fit and
judgement resume from the stream at its cuts (`fit_and_judge`), so a finalist costs its kept blocks after its
first cut, once.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from layershap.models.layers import num_layers
from layershap.plan.cost import Cost
from layershap.plan.methods.base import Plan
from layershap.transform.repair import dense_streams, fit_and_judge, recipe_for, removed_runs


def choose_for_repair(model, plan: Plan, calibration, recipe: str, *, batch_size: int = 8) -> Plan:
    """The plan among `plan.details["finalists"]` (and `plan.remove`) with the lowest calibration NLL after
    `recipe`'s repair; `plan` itself when there is nothing to choose from. The returned plan's details gain
    `repair_choice` (every finalist's NLL before and after repair, the ranking's agreement, what it cost) and
    its cost includes this step's passes."""
    candidates = _candidates(plan)
    if recipe_for(recipe).kind == "none" or len(candidates) < 2:
        return plan
    if "chosen" in plan.details.get("confirmation", {}):  # --confirm already judged them, on fresh windows
        return replace(plan, details={**plan.details, "repair_choice": {
            "skipped": "the plan was confirmed on fresh windows (--confirm); it is kept as confirmed"}})
    started = time.perf_counter()
    tokens = calibration.tokens
    n = num_layers(model)
    cost = Cost()
    cuts = {tuple(removal): removed_runs(removal, n) for removal in candidates}
    ends = {cut.end for runs in cuts.values() for cut in runs}
    dense = dense_streams(model, ends, tokens, batch_size, cost, starts={runs[0].start for runs in cuts.values()})
    screened = _screened(plan)
    rows = []
    for removal in candidates:
        before = screened.get(tuple(removal))
        if before is None:  # not measured by the search on these windows (or no search): measure it
            unrepaired, before = fit_and_judge(model, removal, tokens, "none", batch_size=batch_size, dense=dense)
            cost.include(unrepaired.cost)
        repair, after = fit_and_judge(model, removal, tokens, recipe, batch_size=batch_size, dense=dense)
        cost.include(repair.cost)
        rows.append({"remove": removal, "nll": before, "repaired_nll": after})
    best = min(range(len(rows)), key=lambda i: (rows[i]["repaired_nll"], i))
    chosen = rows[best]["remove"]
    report = {"recipe": recipe, "windows": calibration.describe(), "finalists": rows, "chosen": chosen,
              "changed": sorted(chosen) != sorted(plan.remove), "rank_agreement": _kendall(rows),
              "cost": {"passes": cost.passes, "token_passes": cost.token_passes},
              "seconds": round(time.perf_counter() - started, 2)}
    total = Cost()
    if plan.cost is not None:
        total.include(plan.cost)
    total.include(cost)
    return replace(plan, remove=[int(i) for i in chosen], forward_passes=total.passes, cost=total,
                   seconds=plan.seconds + (time.perf_counter() - started),
                   details={**plan.details, "repair_choice": report})


def _screened(plan: Plan) -> dict[tuple, float]:
    """The search's NLLs of its finalists on the calibration windows (`finalist_nlls`), by removal; only
    where the plan's loss is the NLL (a KL-utility search measured KLs)."""
    if plan.details.get("loss", "nll") not in ("nll", None):
        return {}
    nlls = plan.details.get("finalist_nlls") or []
    return {tuple(sorted(r)): float(v) for r, v in zip(plan.details.get("finalists", []), nlls) if v is not None}


def _candidates(plan: Plan) -> list[list[int]]:
    seen, out = set(), []
    for removal in [plan.remove, *plan.details.get("finalists", [])]:
        key = tuple(sorted(int(i) for i in removal))
        if key not in seen:
            seen.add(key)
            out.append(list(key))
    return out


def _kendall(rows: list[dict]) -> float | None:
    """Kendall's tau between the finalists' order before and after repair (1: repair changes no ranking)."""
    before = np.array([r["nll"] for r in rows])
    after = np.array([r["repaired_nll"] for r in rows])
    pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    if not pairs:
        return None
    agree = sum(np.sign(before[i] - before[j]) * np.sign(after[i] - after[j]) for i, j in pairs)
    return round(float(agree / len(pairs)), 4)
