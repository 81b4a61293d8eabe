"""The held-out race: every method on the same calibration windows, judged on genres it was not calibrated on.

For every calibration mixture, draw (the seed of the calibration windows) and k, every method chooses k
blocks of the embedded default model (SmolLM2-135M) on the same windows (`text_windows(mixture, seed=draw)`,
the calibration halves). Each plan is then measured on the evaluation half of every packaged genre that is not
part of that mixture (wiki, c4, code, technical, multilingual, tiny), with the same held-out windows for every
draw, and summarised as the geometric mean of the perplexities over those genres. Per draw, layershap's
variants are compared with the best rival of that draw (the lowest geometric mean among the other methods);
the summary gives the mean and the worst of that ratio over the draws.

Methods: `shapley` (the default settings), `shapley-kl` (the default with `--utility kl`), `shapley+confirm`
(the default with `--confirm` rounds of successive halving on fresh calibration windows; it also reports
`shapley+confirm:screened`, the plan its screening alone would have kept, i.e. the same run without the
confirmation step, with the screening's own cost and seconds: the run's less the confirmation's), any of them
at another budget with `@B` (`shapley@64`: `--budget 64`), `shortgpt`, `angular`, `loo`, `sleb`, `paper` (the
paper preset's recipe at `--paper-budget` masks on the same windows).

Cost: every row has the method's `cost` (passes and token-passes used, and paid by this run). The layershap
variants of one draw share an evaluation store under `--cache`, so their paid cost and seconds can be lower
than on a cold store; the used cost is what they would spend on a cold one. `loo` is read off the same
store (the target sampler measures the full model and every single removal first, which is all
leave-one-out needs); its cost is its own, n + 1 full passes. Held-out perplexities are cached by model
fingerprint, measurement context and plan, and the output says how many were read from the cache.

The whole grid (5 draws x 2 mixtures x k = 7, 8 (ratio 0.25), 10; every method but the paper preset) is the
defaults, one process, about 9 hours on 2 CPU cores:

    python benchmarks/heldout_race.py --json race.json

Parts of it can run side by side (each with its own --json, one thread each) and be joined:

    OMP_NUM_THREADS=1 python benchmarks/heldout_race.py --mixtures c4 --ks 7 --ratios "" --json a.json &
    OMP_NUM_THREADS=1 python benchmarks/heldout_race.py --mixtures c4 --ks 10 --store-per draw --json b.json &
    python benchmarks/heldout_race.py --methods "" --json race.json --merge a.json b.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _setup import geometric_mean, write_result

import layershap
from layershap.data.windows import PACKAGED_TEXTS, mixture_texts, text_windows
from layershap.estimate.pipeline import EstimateSettings, preset_settings
from layershap.game.context import measurement_context, model_fingerprint
from layershap.game.layer_game import LayerGame
from layershap.game.measure import evaluate_masks
from layershap.game.nll import perplexity
from layershap.game.store import open_store
from layershap.io import write_json
from layershap.models.layers import keep_only, num_layers
from layershap.plan.confirm import confirmation_windows
from layershap.plan.cost import Cost
from layershap.plan.methods import select_layers
from layershap.plan.methods.base import lowest_scoring
from layershap.plan.methods.loo import loo_scores
from layershap.plan.ratio import layers_to_remove
from layershap.plan.search import removal_mask

GENRES = list(PACKAGED_TEXTS)  # wiki, c4, code, tiny, technical, multilingual
LAYERSHAP = ("shapley", "shapley-kl", "shapley+confirm", "shapley+confirm:screened")


def is_layershap(method: str) -> bool:
    """A layershap variant (judged against the rivals), `@B` budgets included: `shapley@64`, `shapley-kl@64`."""
    return method.partition("@")[0] in LAYERSHAP


CACHE = Path(__file__).resolve().parent / ".cache"


class HeldOut:
    """Held-out perplexity of a plan on every genre, cached on disk as the store keys its rows: by the model's
    fingerprint (config and every weight), the measurement context (the genre's windows, dtype, device,
    attention, batch size, torch and transformers versions: `game/context.py`) and the removed blocks, so a
    reused `--cache` never serves a number another model or setup measured. `read` and `measured` count the
    cells (one plan on one genre) taken from the cache and measured by this process."""

    def __init__(self, model, tokenizer, samples: int, seq_len: int, path: Path, *, batch_size: int = 8,
                 genres=GENRES):
        self.model, self.path, self.batch_size = model, path, batch_size
        self.windows = {g: text_windows(g, tokenizer, samples=samples, seq_len=seq_len, seed=0, split="evaluation")
                        for g in genres}
        self.cache = json.loads(path.read_text()) if path.is_file() else {}
        self.read = self.measured = 0
        fingerprint = model_fingerprint(model)
        self.prefix = {g: f"{fingerprint}:{measurement_context(LayerGame(model, w, batch_size=batch_size))}"
                       for g, w in self.windows.items()}

    def ppl(self, removed, genres) -> dict[str, float]:
        """{genre: perplexity} of the model without the `removed` blocks."""
        mask = removal_mask(num_layers(self.model), removed)
        out = {}
        for genre in genres:
            key = f"{self.prefix[genre]}:{','.join(map(str, sorted(removed)))}"
            if key in self.cache:
                self.read += 1
            else:
                with keep_only(self.model, mask):
                    self.cache[key] = perplexity(self.model, self.windows[genre].tokens, batch_size=self.batch_size)
                self.measured += 1
                # atomic, and merged with what another race process sharing --cache wrote meanwhile
                on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
                self.cache = {**on_disk, **self.cache}
                write_json(self.path, self.cache)
            out[genre] = self.cache[key]
        return out

    def summary(self) -> str:
        return (f"held-out perplexities: {self.read} of {self.read + self.measured} cells read from the cache "
                f"({self.path}), {self.measured} measured")


def loo_from_store(model, calibration, k: int, store) -> tuple[list[int], Cost]:
    """The leave-one-out plan from the store (measuring what is missing), with loo's own cost."""
    n = num_layers(model)
    game = LayerGame(model, calibration)
    masks = np.array([removal_mask(n, []), *(removal_mask(n, [i]) for i in range(n))])
    with open_store(model, store) as db:
        nlls, _, _ = evaluate_masks(game, db, masks, description="leave-one-out")
    tokens = int(calibration.tokens.numel())
    cost = Cost.full_passes(1, tokens, n)
    cost.add(tokens, n, passes=n)
    return lowest_scoring(loo_scores(float(nlls[0]), list(nlls[1:])), k), cost


class GreedySleb:
    """SLEB at every k of a draw from one run at the largest: its first k greedy steps are SLEB at k, so the
    plan, cost and seconds at a smaller k are read off the longer run's steps (each step's trials are what
    SLEB at that k would run, and they are timed per step). With a `directory`, the steps are kept there
    per calibration, so a restarted race does not run SLEB again."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory
        self.runs: dict[str, list[dict]] = {}

    def steps(self, model, calibration, k_max: int) -> list[dict]:
        key = f"{calibration.fingerprint()}-n{num_layers(model)}"
        if len(self.runs.get(key, [])) < k_max:
            path = self.directory / f"sleb-{key}.json" if self.directory else None
            steps = json.loads(path.read_text()) if path and path.is_file() else []
            if len(steps) < k_max:
                steps = select_layers("sleb", model, calibration, k_max).details["steps"]
                if path:
                    write_json(path, steps)
            self.runs = {key: steps}
        return self.runs[key]

    def plan(self, model, calibration, k: int, k_max: int) -> dict:
        steps = self.steps(model, calibration, k_max)[:k]
        n, tokens = num_layers(model), int(calibration.tokens.numel())
        cost = Cost()
        for t in range(k):
            cost.add(tokens, n - t, passes=n - t)  # n - t trials, each keeping n - t - 1 blocks plus the head
        return {"method": "sleb", "removed": sorted(s["removed"] for s in steps), "cost": vars(cost),
                "seconds": sum(s["seconds"] for s in steps)}


SLEB = GreedySleb()


def run_method(method, model, tokenizer, mixture, calibration, k, args, store) -> list[dict]:
    """One method's rows (two for shapley+confirm) at one draw and k."""
    started = time.perf_counter()
    if method == "sleb":
        return [SLEB.plan(model, calibration, k, max(args.k_values))]
    if method == "loo":
        remove, cost = loo_from_store(model, calibration, k, store)
        return [{"method": "loo", "removed": remove, "cost": vars(cost), "seconds": time.perf_counter() - started}]
    options = {}
    name = method
    if method.startswith("shapley"):
        variant, _, budget = method.partition("@")  # shapley@64: the same at --budget 64
        budget = int(budget) if budget else args.budget
        confirm = args.confirm if variant == "shapley+confirm" else 0
        utility = {"utility": "kl"} if variant == "shapley-kl" else {}
        options["settings"] = EstimateSettings(**({"budget": budget} if budget else {}), **utility,
                                               target_removed=k, seed=calibration.seed, confirm=confirm)
        options["store"] = store
        name = "shapley"
        if confirm:
            options["confirmation_windows"] = confirmation_windows(mixture, tokenizer, calibration, confirm)
    elif method == "paper":
        paper = {key: v for key, v in preset_settings("paper").items() if key not in ("samples", "seq_len")}
        options["settings"] = EstimateSettings(**{**paper, "budget": args.paper_budget, "target_removed": k,
                                                  "seed": calibration.seed})
        options["store"] = store
        name = "shapley"
    plan = select_layers(name, model, calibration, k, seed=calibration.seed, **options)
    row = {"method": method, "removed": plan.remove, "cost": vars(plan.cost),
           "seconds": time.perf_counter() - started,
           "cold": plan.cost.paid_passes == plan.cost.passes}  # seconds are a cold run's only when all was paid
    rows = [row]
    confirmation = plan.details.get("confirmation", {})
    if "screening_choice" in confirmation:
        row["confirmation"] = {key: confirmation[key] for key in ("rounds", "reserved_full_passes", "cost", "seconds")}
        rows.append(screened_row(row, confirmation))
    return rows


def screened_row(row: dict, confirmation: dict) -> dict:
    """The `shapley+confirm:screened` row: the plan the screening kept, with the screening's own cost and
    seconds (the whole run's less the confirmation's), not the confirmed run's."""
    cost = {key: value - confirmation["cost"][key] if key != "estimated" else value
            for key, value in row["cost"].items()}
    return {"method": "shapley+confirm:screened", "removed": confirmation["screening_choice"], "cost": cost,
            "seconds": row["seconds"] - confirmation["seconds"], "cold": cost["paid_passes"] == cost["passes"]}


def summarise(rows: list[dict]) -> list[dict]:
    """Per mixture, k and layershap variant: the ratio to the best rival per draw, its mean and its worst."""
    summary = []
    for mixture in dict.fromkeys(r["mixture"] for r in rows):
        for k in sorted({r["k"] for r in rows if r["mixture"] == mixture}):
            cell = [r for r in rows if r["mixture"] == mixture and r["k"] == k]
            draws = sorted({r["draw"] for r in cell})
            for variant in [m for m in dict.fromkeys(r["method"] for r in cell) if is_layershap(m)]:
                ratios, per_draw = [], []
                for d in draws:
                    here = {r["method"]: r["geomean"] for r in cell if r["draw"] == d}
                    rivals = {m: v for m, v in here.items() if not is_layershap(m)}
                    if variant not in here or not rivals:
                        continue
                    best = min(rivals, key=rivals.get)
                    ratio = here[variant] / rivals[best]
                    ratios.append(ratio)
                    per_draw.append({"draw": d, "geomean": here[variant], "best_rival": best,
                                     "best_rival_geomean": rivals[best], "ratio": ratio})
                if ratios:
                    summary.append({"mixture": mixture, "k": k, "method": variant, "mean_ratio": float(np.mean(ratios)),
                                    "worst_ratio": float(max(ratios)), "draws": per_draw})
    return summary


def merge_rows(rows: list[dict], other: list[dict]) -> list[dict]:
    """`rows` and `other` as one race; a row of `other` replaces the one for the same (mixture, draw, k, method)."""
    def key(r):
        return r["mixture"], r["draw"], r["k"], r["method"]

    merged = {key(r): r for r in rows}
    merged.update({key(r): r for r in other})
    return list(merged.values())


def compare_mixtures(rows: list[dict]) -> list[dict]:
    """Which calibration mixture serves held-out text best: per k and method, each mixture's plans judged on
    the genres that no raced mixture contains (the same genres for every mixture), mean and worst over draws."""
    mixtures = list(dict.fromkeys(r["mixture"] for r in rows))
    common = [g for g in GENRES if not any(g in mixture_texts(m) for m in mixtures)]
    if len(mixtures) < 2 or not common:
        return []
    out = []
    for k in sorted({r["k"] for r in rows}):
        for method in dict.fromkeys(r["method"] for r in rows if r["k"] == k):
            for mixture in mixtures:
                cell = [r for r in rows if (r["k"], r["method"], r["mixture"]) == (k, method, mixture)]
                values = [geometric_mean(r["ppl"][g] for g in common) for r in cell]
                if values:
                    out.append({"k": k, "method": method, "mixture": mixture, "genres": common,
                                "draws": len(values), "mean": float(np.mean(values)), "worst": float(max(values))})
    return out


def block_ranges(blocks) -> str:
    """[5, 12, 13, 14] -> '5, 12-14'."""
    runs: list[list[int]] = []
    for b in sorted(blocks):
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def per_draw_tables(rows: list[dict]) -> list[str]:
    """One table per (mixture, k): a row per draw, a column per method (plan: geomean), the draw's best in bold."""
    lines = []
    for mixture in dict.fromkeys(r["mixture"] for r in rows):
        for k in sorted({r["k"] for r in rows if r["mixture"] == mixture}):
            cell = [r for r in rows if r["mixture"] == mixture and r["k"] == k]
            methods = list(dict.fromkeys(r["method"] for r in cell))
            lines += ["", f"`{mixture}`, k = {k}:", "", "| draw | " + " | ".join(methods) + " |",
                      "|---" * (len(methods) + 1) + "|"]
            for d in sorted({r["draw"] for r in cell}):
                here = {r["method"]: r for r in cell if r["draw"] == d}
                best = min(r["geomean"] for r in here.values())
                entries = []
                for m in methods:
                    if m not in here:
                        entries.append("")
                        continue
                    value = f"{here[m]['geomean']:.2f}"
                    entries.append(f"{block_ranges(here[m]['removed'])}: "
                                   + (f"**{value}**" if here[m]["geomean"] == best else value))
                lines.append(f"| {d} | " + " | ".join(entries) + " |")
    return lines


def markdown(rows: list[dict], summary: list[dict]) -> str:
    lines = [("| mixture | k | draw | method | removed | geomean ppl | used passes | used token-passes (M) | "
             "seconds (cold) |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = f"{r['seconds']:.0f}" if r.get("cold", True) else "(warm store)"
        lines.append(f"| {r['mixture']} | {r['k']} | {r['draw']} | {r['method']} | "
                     f"{', '.join(map(str, r['removed']))} | {r['geomean']:.2f} | {r['cost']['passes']} | "
                     f"{r['cost']['token_passes'] / 1e6:.2f} | {seconds} |")
    lines += ["", "| mixture | k | method | ratio to best rival, per draw | mean | worst |", "|---|---|---|---|---|---|"]
    for s in summary:
        per = ", ".join(f"{d['ratio']:.3f} ({d['best_rival']})" for d in s["draws"])
        lines.append(f"| {s['mixture']} | {s['k']} | {s['method']} | {per} | {s['mean_ratio']:.3f} | "
                     f"{s['worst_ratio']:.3f} |")
    mixtures = compare_mixtures(rows)
    if mixtures:
        lines += ["", f"Calibration mixtures judged on the genres none of them contains ({', '.join(mixtures[0]['genres'])}):",
                  "", "| k | method | mixture | draws | mean geomean ppl | worst |", "|---|---|---|---|---|---|"]
        lines += [f"| {m['k']} | {m['method']} | {m['mixture']} | {m['draws']} | {m['mean']:.2f} | {m['worst']:.2f} |"
                  for m in mixtures]
    return "\n".join(lines + per_draw_tables(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=5, help="calibration draws (seeds 0..draws-1)")
    parser.add_argument("--first-draw", type=int, default=0)
    parser.add_argument("--mixtures", default="c4;c4,wiki,code", help="calibration mixtures, separated by ;")
    parser.add_argument("--methods", default="shapley,shapley-kl,shortgpt,angular,loo,sleb")
    parser.add_argument("--ks", default="7,10")
    parser.add_argument("--ratios", default="0.25", help="also the k of these ratios (compare's default: 0.25)")
    parser.add_argument("--budget", type=int, default=None, help="shapley's --budget (default: the library's)")
    parser.add_argument("--paper-budget", type=int, default=8000)
    parser.add_argument("--confirm", type=int, default=3, help="halving rounds of shapley+confirm")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=4, help="held-out windows per genre")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--cache", default=str(CACHE), help="stores and held-out perplexities, kept across runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--store-per", choices=("k", "draw"), default="k",
                        help="k: a cold store for every (draw, k), so every layershap row's seconds are a cold run's; "
                             "draw: one store per draw shared by its ks (the estimate's masks are the same at every "
                             "k, so a later k pays only its search: cheaper, and its seconds read '(warm store)')")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="race JSONs whose rows join this one's (e.g. parts run in parallel), the newer row "
                             "winning on the same (mixture, draw, k, method)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json and run only the missing (mixture, draw, k, method)")
    args = parser.parse_args()
    model, tokenizer = layershap.load_model()
    cache = Path(args.cache)
    held_out = HeldOut(model, tokenizer, args.eval_samples, args.eval_seq_len,
                       cache / f"heldout-{args.eval_samples}x{args.eval_seq_len}.json")
    methods = [m for m in args.methods.split(",") if m]
    mixtures = [m for m in args.mixtures.split(";") if m]
    n = num_layers(model)
    ks = sorted({int(v) for v in args.ks.split(",") if v}
                | {layers_to_remove(float(r), n) for r in args.ratios.split(",") if r})
    args.k_values = ks
    SLEB.directory = cache / "sleb"
    rows: list[dict] = []
    dense = {}
    if args.resume and args.json and Path(args.json).is_file():  # a killed or narrower earlier run: keep its rows
        rows = json.loads(Path(args.json).read_text())["rows"]
    for other in args.merge:
        if not Path(other).is_file():
            parser.error(f"--merge {other}: no such file")
        rows = merge_rows(rows, json.loads(Path(other).read_text())["rows"])
    for mixture in dict.fromkeys([*mixtures, *(r["mixture"] for r in rows)]):  # merged mixtures' too
        ppl = held_out.ppl([], [g for g in GENRES if g not in mixture_texts(mixture)])
        dense[mixture] = {"ppl": ppl, "geomean": geometric_mean(ppl.values())}
    done = {(r["mixture"], r["draw"], r["k"], r["method"]) for r in rows}

    def save():
        summary = summarise(rows)
        write_result(args.json, {"arguments": vars(args), "genres": GENRES, "dense": dense, "rows": rows,
                                 "summary": summary, "mixtures": compare_mixtures(rows),
                                 "markdown": markdown(rows, summary),
                                 "heldout_cache": {"read": held_out.read, "measured": held_out.measured}})

    for mixture in mixtures:
        genres = list(dense[mixture]["ppl"])
        for draw in range(args.first_draw, args.first_draw + args.draws):
            calibration = text_windows(mixture, tokenizer, samples=args.samples, seq_len=args.seq_len, seed=draw)
            for k in (sorted(ks, reverse=True) if args.store_per == "draw" else ks):  # draw: the largest k runs cold
                # one store per k: each k's layershap run starts cold, so its seconds are a cold run's
                suffix = f"-k{k}" if args.store_per == "k" else ""
                store = cache / "stores" / f"{mixture.replace(',', '+').replace(':', '_')}-d{draw}{suffix}.sqlite"
                store.parent.mkdir(parents=True, exist_ok=True)
                for method in methods:
                    if (mixture, draw, k, method) in done:
                        continue
                    for row in run_method(method, model, tokenizer, mixture, calibration, k, args, store):
                        read = held_out.read
                        ppl = held_out.ppl(row["removed"], genres)
                        row.update({"mixture": mixture, "draw": draw, "k": k, "ppl": ppl,
                                    "heldout_from_cache": held_out.read - read,
                                    "geomean": geometric_mean(ppl.values()),
                                    "calibration": calibration.describe()})
                        rows.append(row)
                        print(f"{mixture} d{draw} k={k} {row['method']:26s} removed={row['removed']} "
                              f"geomean={row['geomean']:.2f} passes={row['cost']['passes']} "
                              f"paid={row['cost']['paid_passes']} {row['seconds']:.0f}s "
                              f"held-out cached={row['heldout_from_cache']}/{len(genres)}", flush=True)
                    save()
    save()
    print(markdown(rows, summarise(rows)))
    print(held_out.summary())


if __name__ == "__main__":
    main()
