"""The repair race: every training-free repair on every method's plan, and layershap choosing for the repair.

For k blocks removed from the embedded default model (SmolLM2-135M, 30 blocks) and each calibration draw
(the seed of the C4 calibration windows, as in `heldout_race.py`):

- plans: angular distance (the choice ReplaceMe and LinearPatch repair), ShortGPT, SLEB and layershap's
  default (`shapley`), read from the held-out race's JSON (`--plans`, default docs/results/heldout_race.json:
  the same draws and windows; their choice costs are that run's), or chosen here when absent;
- `shapley>R`: layershap choosing for the repaired model: the default Shapley search run here, its finalists
  judged after repair R (`transform/repair_choice.py`, what `prune --repair R` does);
- every recipe of `transform/repair.py` on every plan, fitted on `--repair-samples` windows of the draw's
  calibration text apart from the choice's windows (what `prune --repair` fits on);
- `+heal`: LoRA healing at `heal`'s default steps on the plan's model, alone and after repair (`--heal`).

Each row is judged on the evaluation half of every packaged genre not in the calibration (wiki, code, tiny,
technical, multilingual; `--eval-samples` windows of 256 tokens, the held-out race's windows) as the geometric
mean of the perplexities, and optionally (`--zero-shot`) on the offline zero-shot pack as the share of the
dense model's accuracy retained, plain and above chance. Rows carry their cost: the choice's token-passes (from
the plans' JSON or measured here), the repair's fitting token-passes and seconds, measured in this run.

Rows are written to `--json` as they finish and a rerun skips the rows already there (`--resume`), keyed by
the model's fingerprint and the measurement settings, so a changed model or setting is measured again.

    python benchmarks/repair_race.py --json docs/results/repair_race.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from _setup import geometric_mean

import layershap
from layershap.data.windows import PACKAGED_TEXTS, text_windows
from layershap.estimate.pipeline import EstimateSettings
from layershap.game.context import model_fingerprint
from layershap.game.nll import perplexity
from layershap.io import write_json
from layershap.plan.methods import select_layers
from layershap.transform.repair import REPAIRS, fit_repair, repaired
from layershap.transform.repair_choice import choose_for_repair

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "docs" / "results" / "heldout_race.json"
CACHE = Path(__file__).resolve().parent / ".cache"
RIVALS = ("angular", "shortgpt", "sleb", "shapley")
CHANCE = {"piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "winogrande": 0.5,
          "boolq": 0.5, "openbookqa": 0.25}


def recorded_plans(path: Path) -> dict:
    """(k, draw, method) -> the held-out race's row for the c4 mixture (removed blocks, cost, seconds)."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {(r["k"], r["draw"], r["method"]): r for r in rows if r.get("mixture") == "c4" and r["method"] in RIVALS}


def held_out(model, windows: dict) -> dict:
    ppl = {name: perplexity(model, w.tokens) for name, w in windows.items()}
    return {"ppl": ppl, "geomean": geometric_mean(ppl.values())}


def zero_shot_row(model, tokenizer, tasks, limit) -> dict:
    from layershap.evaluate.zeroshot import zero_shot

    result = zero_shot(model, tokenizer, tasks, limit=limit, batch_size=16, seed=0, offline=True)
    return {task: result[task]["acc"] for task in tasks}


def retained(acc: dict, dense: dict) -> dict:
    """Share of the dense model's accuracy kept, plain (ReplaceMe's and LinearPatch's metric) and above chance."""
    plain = [acc[t] / dense[t] for t in acc]
    above = [(acc[t] - CHANCE[t]) / (dense[t] - CHANCE[t]) for t in acc if dense[t] > CHANCE[t]]
    return {"retained": sum(plain) / len(plain), "retained_above_chance": sum(above) / len(above) if above else None}


def key_of(context: dict, **cell) -> str:
    return hashlib.blake2b(json.dumps({**context, **cell}, sort_keys=True).encode(), digest_size=10).hexdigest()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="7,8,10")
    parser.add_argument("--draws", default="0,1,2,3,4")
    parser.add_argument("--methods", default=",".join(RIVALS))
    parser.add_argument("--recipes", default=",".join(REPAIRS))
    parser.add_argument("--choose-for", default="scale,prunecomp",
                        help="recipes layershap chooses for (rows shapley>R); empty for none")
    parser.add_argument("--choose-ks", default=None, help="ks of the shapley>R rows (default: --ks)")
    parser.add_argument("--choose-draws", default=None, help="draws of the shapley>R rows (default: --draws)")
    parser.add_argument("--plans", type=Path, default=PLANS)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repair-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--zero-shot", default="", help="cells k:draw (e.g. 8:0) whose rows also get zero-shot")
    parser.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--heal", default="", help="cells k:draw that also get +heal rows (LoRA, default steps)")
    parser.add_argument("--heal-recipe", default="scale")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="other runs' JSON whose rows join this one (parts run side by side)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = layershap.load_model()
    genres = [g for g in PACKAGED_TEXTS if g != "c4"]
    windows = {g: text_windows(g, tokenizer, samples=args.eval_samples, seq_len=args.eval_seq_len, seed=0,
                               split="evaluation") for g in genres}
    context = {"model": model_fingerprint(model), "eval": [args.eval_samples, args.eval_seq_len],
               "calibration": [args.samples, args.seq_len], "repair_samples": args.repair_samples,
               "torch": torch.__version__, "layershap": layershap.__version__}
    zero_cells = {tuple(int(x) for x in c.split(":")) for c in args.zero_shot.split(",") if c}
    heal_cells = {tuple(int(x) for x in c.split(":")) for c in args.heal.split(",") if c}
    tasks = [t for t in args.tasks.split(",") if t]
    done, previous = {}, {}
    if args.json.is_file():
        previous = json.loads(args.json.read_text())
        done = {row["key"]: row for row in previous.get("rows", []) if "key" in row}
    for part in args.merge:
        rows = json.loads(part.read_text()).get("rows", [])
        done.update({row["key"]: row for row in rows if "key" in row})
    result = {"arguments": {k: str(v) for k, v in vars(args).items()}, "context": context, "genres": genres,
              "dense": held_out(model, windows), "rows": list(done.values())}
    reused = 0
    if zero_cells:
        dense_key = key_of(context, row="dense-zero-shot", tasks=tasks, limit=args.limit)
        result["dense_zero_shot"] = previous.get("dense_zero_shot")
        if (result["dense_zero_shot"] or {}).get("key") != dense_key:
            result["dense_zero_shot"] = None
        if result["dense_zero_shot"] is None:
            result["dense_zero_shot"] = {"key": dense_key, "acc": zero_shot_row(model, tokenizer, tasks, args.limit)}
            write_json(args.json, result)
    plans = recorded_plans(args.plans)

    def emit(row):
        result["rows"].append(row)
        write_json(args.json, result)
        print(f"k={row['k']} draw={row['draw']} {row['method']:>16} {row['recipe']:>16}: "
              f"geomean {row['geomean']:.2f}" + (f" retained {row['zero_shot']['retained']:.3f}"
                                                 if "zero_shot" in row else ""), flush=True)

    measured = {}  # (draw, removed, recipe, zero-shot) -> the measurement, shared by methods with the same plan

    def judge(k, draw, method, removed, recipe, repair_windows, choice_cost, extra=None):
        nonlocal reused
        cell = {"k": k, "draw": draw, "method": method, "recipe": recipe, "removed": sorted(removed)}
        key = key_of(context, **cell, zero=(k, draw) in zero_cells, tasks=tasks, limit=args.limit)
        if key in done:
            reused += 1
            return done[key]
        same = measured.get((draw if recipe != "none" else None, tuple(sorted(removed)), recipe,
                             (k, draw) in zero_cells))
        if same is not None:
            row = {**same, **cell, "key": key, "choice_cost": choice_cost, **(extra or {}),
                   "measured_with": same["method"]}
            emit(row)
            return row
        started = time.perf_counter()
        repair = fit_repair(model, removed, repair_windows.tokens, recipe)
        fit_seconds = time.perf_counter() - started
        with repaired(model, removed, repair):
            row = {**cell, "key": key, **held_out(model, windows), "choice_cost": choice_cost,
                   "repair": {"cuts": [f.describe() for f in repair.fits], "token_passes": repair.cost.token_passes,
                              "seconds": round(fit_seconds, 2)}, **(extra or {})}
            if (k, draw) in zero_cells:
                acc = zero_shot_row(model, tokenizer, tasks, args.limit)
                row["zero_shot"] = {"acc": acc, **retained(acc, result["dense_zero_shot"]["acc"])}
        # no repair: the plan's numbers do not depend on the draw; a repair is fitted on the draw's windows
        measured[(draw if recipe != "none" else None, tuple(sorted(removed)), recipe, (k, draw) in zero_cells)] = row
        emit(row)
        return row

    ks = [int(k) for k in args.ks.split(",") if k]
    draws = [int(d) for d in args.draws.split(",") if d]
    choose_ks = [int(k) for k in (args.choose_ks or args.ks).split(",") if k]
    choose_draws = [int(d) for d in (args.choose_draws or args.draws).split(",") if d]
    recipes = [r for r in args.recipes.split(",") if r]
    for k in ks:
        for draw in draws:
            calibration = text_windows("c4", tokenizer, samples=args.samples, seq_len=args.seq_len, seed=draw,
                                       split="calibration")
            repair_windows = text_windows("c4", tokenizer, samples=args.repair_samples, seq_len=args.seq_len,
                                          seed=draw, split="calibration", exclude=calibration)
            for method in [m for m in args.methods.split(",") if m]:
                recorded = plans.get((k, draw, method))
                if recorded is not None:
                    removed, cost = recorded["removed"], {**recorded["cost"], "from": str(args.plans.name)}
                else:
                    plan = select_layers(method, model, calibration, k, seed=draw)
                    removed, cost = plan.remove, {**vars(plan.cost), "from": "this run"}
                for recipe in recipes:
                    judge(k, draw, method, removed, recipe, repair_windows, cost)
            if k in choose_ks and draw in choose_draws:
                for recipe in [r for r in args.choose_for.split(",") if r]:
                    store = CACHE / f"repair_race_k{k}_d{draw}.sqlite"
                    CACHE.mkdir(exist_ok=True)
                    settings = EstimateSettings(target_removed=k, seed=draw)
                    started = time.perf_counter()
                    plan = select_layers("shapley", model, calibration, k, seed=draw, settings=settings,
                                         store=str(store))
                    plan.seconds = time.perf_counter() - started
                    chosen = choose_for_repair(model, plan, calibration, recipe)
                    report = chosen.details.get("repair_choice", {})
                    judge(k, draw, f"shapley>{recipe}", chosen.remove, recipe, repair_windows,
                          {**vars(chosen.cost), "from": "this run"},
                          {"before_repair_choice": plan.remove,
                           "repair_choice": {key: report.get(key) for key in ("changed", "rank_agreement", "cost")},
                           "finalists": len(report.get("finalists", []))})
            if (k, draw) in heal_cells:
                heal_rows(model, tokenizer, k, draw, plans, args, windows, calibration, repair_windows, emit,
                          context, done)
    result["reused_rows"] = reused
    result["summary"] = summarise(result["rows"])
    write_json(args.json, result)
    print(f"{reused} rows read from {args.json} (same model fingerprint and settings)")
    for line in result["summary"]:
        print(json.dumps(line))


def heal_rows(model, tokenizer, k, draw, plans, args, windows, calibration, repair_windows, emit, context, done):
    """LoRA healing (heal's defaults: 100 steps, 64 windows) on the plan's model, alone and after repair; the
    model is reloaded for each so the healed weights never leak into other rows."""
    from layershap.models.layers import prune_layers
    from layershap.transform.heal import heal_model
    from layershap.transform.repair import fold_repair

    recorded = plans.get((k, draw, "shapley"))
    if recorded is None:
        return
    removed = recorded["removed"]
    heal_windows = text_windows("c4", tokenizer, samples=64, seq_len=args.seq_len, seed=draw, split="calibration")
    for recipe in ("none", args.heal_recipe):
        cell = {"k": k, "draw": draw, "method": "shapley+heal", "recipe": recipe, "removed": sorted(removed)}
        key = key_of(context, **cell)
        if key in done:
            continue
        fresh, _ = layershap.load_model()
        started = time.perf_counter()
        repair = fit_repair(fresh, removed, repair_windows.tokens, recipe)
        prune_layers(fresh, removed)
        fold_repair(fresh, repair)
        fresh, _ = heal_model(fresh, heal_windows, steps=100, progress=False)
        emit({**cell, "key": key, **held_out(fresh.eval(), windows), "heal_seconds": time.perf_counter() - started,
              "heal_steps": 100})


def summarise(rows: list[dict]) -> list[dict]:
    """Per k, method and recipe: mean and worst geometric mean over draws, the mean ratio to layershap's
    unrepaired plan of the same draw, mean retained zero-shot where measured, and the mean repair cost."""
    base = {(r["k"], r["draw"]): r["geomean"] for r in rows if r["method"] == "shapley" and r["recipe"] == "none"}
    out = []
    for k in sorted({r["k"] for r in rows}):
        cells = {}
        for r in rows:
            if r["k"] == k:
                cells.setdefault((r["method"], r["recipe"]), []).append(r)
        for (method, recipe), cell in sorted(cells.items()):
            ratios = [r["geomean"] / base[(k, r["draw"])] for r in cell if (k, r["draw"]) in base]
            zs = [r["zero_shot"]["retained"] for r in cell if "zero_shot" in r]
            out.append({"k": k, "method": method, "recipe": recipe, "draws": len(cell),
                        "mean_geomean": sum(r["geomean"] for r in cell) / len(cell),
                        "worst_geomean": max(r["geomean"] for r in cell),
                        "mean_ratio_to_unrepaired_shapley": sum(ratios) / len(ratios) if ratios else None,
                        "worst_ratio_to_unrepaired_shapley": max(ratios) if ratios else None,
                        "mean_retained_zero_shot": sum(zs) / len(zs) if zs else None,
                        "mean_repair_token_passes": sum(r.get("repair", {}).get("token_passes", 0) for r in cell)
                        / len(cell)})
    return out


if __name__ == "__main__":
    main()
