"""Quality per forward pass: held-out perplexity of every method at 7 and 10 removed blocks, side by side.

Setup of `shared/ANCHORS.md` (SmolLM2-135M, calibration on the first 8 x 128 tokens of C4, evaluation on 16 x
256 tokens of Wikipedia from character 100,000). Every method runs on a fresh evaluation store, so its
forward passes are its own. With `--curve`, also held-out perplexity against the number of evaluations for
layershap and the paper preset: each curve point is a full run at that budget, and the x value is the
number of masks it used. The points of one method share a store (`--curve-store DIR` keeps it across
runs), because a larger budget's masks extend a smaller one's: a point pays only for what the smaller
budgets did not measure, and is otherwise the same run as on a fresh store.

    python benchmarks/quality.py --json quality.json
    python benchmarks/quality.py --methods shapley,paper,shortgpt --ks 7 --curve 32,64,128,256 --json q.json
    python benchmarks/quality.py --methods shapley,shortgpt,angular,loo --calibration-start 300000 --json q3.json
    python benchmarks/quality.py --methods shapley,shortgpt,angular,loo,sleb --calibration-samples 16 --json q16.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _setup import anchors_setup, scratch_store, write_result

from layershap.estimate.pipeline import EstimateSettings, preset_settings
from layershap.game.nll import perplexity
from layershap.models.layers import keep_only
from layershap.plan.methods import select_layers
from layershap.plan.methods.base import Plan, lowest_scoring

# Methods that score every block once and remove the k lowest: their scores do not depend on k, so one run
# serves every k, at the same cost (each later k's row says which run it reused).
RANKING_METHODS = {"paper", "shortgpt", "loo", "taylor", "kernelshap", "permutation", "stratified", "svarm", "kadd"}
DEFAULT_METHODS = "shapley,paper,shortgpt,angular,loo,sleb,taylor,kernelshap,permutation,stratified,svarm,kadd"


def settings_for(method: str, budget: int, k: int) -> tuple[str, EstimateSettings]:
    """The registered method to run, and the estimate settings it gets at this budget. The paper preset keeps
    its sampler, surrogate, utility and plan but shares everyone's calibration windows, for a fair race."""
    if method == "paper":
        paper = {key: value for key, value in preset_settings("paper").items() if key not in ("samples", "seq_len")}
        return "shapley", EstimateSettings(**{**paper, "budget": budget, "target_removed": k})
    return method, EstimateSettings(budget=budget, target_removed=k)


def run(model, calibration, evaluation, method: str, k: int, budget: int, store, earlier: dict | None = None) -> dict:
    """One method at one k and budget; `forward_passes` counts what this call measured, `masks` what the
    method used (they differ only on a shared curve store). `earlier`: a row of the same ranking method at
    another k, whose scores give this k's plan without running it again."""
    if earlier is not None:
        remove = lowest_scoring(earlier["scores"], k)
        plan = Plan(method, len(earlier["scores"]), remove, earlier["scores"], earlier["forward_passes"],
                    earlier["seconds"], {"estimate": {"masks": earlier["masks"]}})
        seconds = earlier["seconds"]
    else:
        name, settings = settings_for(method, budget, k)
        started = time.perf_counter()
        plan = select_layers(name, model, calibration, k, settings=settings, store=store, budget=budget)
        seconds = time.perf_counter() - started
    mask = np.ones(plan.n_layers, dtype=bool)
    mask[plan.remove] = False
    with keep_only(model, mask):
        ppl = perplexity(model, evaluation.tokens)
    row = {"method": method, "k": k, "ratio": k / plan.n_layers, "removed": plan.remove, "ppl": {"wiki": ppl},
           # what this call measured (Plan.forward_passes is now what the method used, store included)
           "forward_passes": plan.cost.paid_passes if plan.cost is not None else plan.forward_passes,
           "token_passes": plan.cost.token_passes if plan.cost is not None else None,
           "seconds": seconds, "budget": budget,
           "masks": plan.details.get("estimate", {}).get("masks", plan.forward_passes), "scores": plan.scores,
           "scores_from_k": earlier["k"] if earlier is not None else k}
    print(f"{method:12s} k={k:2d} passes={plan.forward_passes:4d} removed={plan.remove} wiki ppl={ppl:9.2f}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--ks", default="7,10")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--curve", default="", help="budgets for the perplexity-vs-evaluations curve")
    parser.add_argument("--curve-store", default=None, help="directory for the curve's stores (kept for reruns)")
    parser.add_argument("--curve-methods", default="shapley,paper", help="methods on the curve")
    parser.add_argument("--calibration-start", type=int, default=0,
                        help="first character of the C4 calibration windows (ANCHORS: 0)")
    parser.add_argument("--calibration-samples", type=int, default=8,
                        help="calibration windows of 128 tokens, the same for every method (ANCHORS: 8)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, _, calibration, evaluation = anchors_setup(calibration_samples=args.calibration_samples,
                                                      calibration_start=args.calibration_start)
    with keep_only(model, np.ones(30, dtype=bool)):
        dense = perplexity(model, evaluation.tokens)
    print(f"dense wiki ppl={dense:.2f}")
    rows, curve = [], []

    def save():  # after every row, so that a long run stopped early keeps what it measured
        write_result(args.json, {"budget": args.budget, "calibration_start": args.calibration_start,
                                 "calibration_samples": args.calibration_samples,
                                 "dense_ppl": {"wiki": dense}, "rows": rows, "curve": curve})

    for method in (m for m in args.methods.split(",") if m):
        for k in (int(v) for v in args.ks.split(",")):
            earlier = next((r for r in rows if r["method"] == method and r["scores"] is not None), None)
            rows.append(run(model, calibration, evaluation, method, k, args.budget, scratch_store(None),
                            earlier if method in RANKING_METHODS else None))
            if args.json:
                save()
    stores = {}
    for budget in sorted(int(v) for v in args.curve.split(",") if v):
        for k in (int(v) for v in args.ks.split(",")):
            for method in (m for m in args.curve_methods.split(",") if m):
                if (method, k) not in stores:
                    stores[method, k] = (Path(args.curve_store) / f"{method}-k{k}.sqlite" if args.curve_store
                                         else scratch_store(None))
                    stores[method, k].parent.mkdir(parents=True, exist_ok=True)
                curve.append(run(model, calibration, evaluation, method, k, budget, stores[method, k]))
                if args.json:
                    save()
    save()


if __name__ == "__main__":
    main()

