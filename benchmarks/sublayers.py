"""The sublayer race: the sublayer plan (`--granularity sublayer`) against the block plan of the same parameter
share and against the sublayer rivals, over several calibration draws, judged on held-out genres.

Default model (SmolLM2-135M-Instruct, 30 blocks, 60 sublayers). Each draw is a seed of the calibration windows
(`--samples` x `--seq-len` tokens of the calibration half of C4, as `layershap prune` and the block race draw
them); each row is judged on the evaluation half of every packaged genre not in the calibration (wiki, code,
tiny, technical, multilingual; `--eval-samples` x `--eval-seq-len`, the held-out race's windows) as the
geometric mean of their perplexities. Rows, at each parameter ratio r:

- `shapley-sublayer`: `plan/sublayer.py` at `--budget` (the default 128), which it splits between the block
  plan that seeds it and the sublayer game (`split_budget`), i.e. what `prune --granularity sublayer` does;
- `shapley-block`: the block plan `prune` makes at the same `--budget`, at the fewest blocks whose parameters
  reach r (8 of 30 at 0.25, 11 at 0.35): the plan the sublayer plan must beat, at no more than 1.5 times its
  token-passes;
- `shapley-block-seed`: the block plan the sublayer game was seeded with (half the budget; its cost is part of
  the sublayer plan's);
- `--block-rivals` (default shortgpt) at the same blocks, `--sublayer-rivals` (default llmdrop, blockpruner);
- `shapley-sublayer@S` (`--block-shares`): the sublayer plan with the share S of `--budget` for its block plan
  instead of half, to measure the split.

Each row carries its cost (forward passes and token-passes the method used, whatever the store held, and those
it paid here), the parameters it keeps and the KV-cache bytes per token it keeps (float16 keys and values of the
attentions kept). One evaluation store per draw, shared by every method and ratio; every finished row is kept
in `rows-d{draw}.json` under `--cache` (default benchmarks/.cache/sublayers/), so a rerun measures only what is
missing, and draws can run side by side in separate processes (`--draws 0` and `--draws 1,2`, then one run
with `--draws 0,1,2` writes the joined JSON without measuring anything).

    python benchmarks/sublayers.py --draws 0,1,2 --ratios 0.25,0.35 --json docs/results/sublayer_race.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _setup import geometric_mean, write_result

import layershap
from layershap.data.windows import PACKAGED_TEXTS, text_windows
from layershap.estimate.pipeline import EstimateSettings
from layershap.evaluate.bench import kv_cache_per_token
from layershap.game.nll import perplexity
from layershap.models.layers import num_layers
from layershap.models.sublayers import block_parameters, keep, sublayer_parameters
from layershap.plan.methods import select_layers
from layershap.plan.methods._sublayers import sublayer_record
from layershap.plan.sublayer import blocks_for_parameter_ratio, select_sublayers, sublayer_mask_of_blocks

CACHE = Path(__file__).parent / ".cache" / "sublayers"


def kv_bytes_per_token(model, mask) -> int:
    """Float16 keys and values cached per token by the attentions the plan keeps: `layershap bench`'s count
    (`kv_cache_per_token`), read with the plan applied, at 2 bytes an element instead of the model's own."""
    with keep(model, mask):
        in_model_dtype = kv_cache_per_token(model)["kv_cache_bytes_per_token"]
    return in_model_dtype * 2 // next(model.parameters()).element_size()


def cost_fields(plan) -> dict:
    cost = plan.cost
    return {"forward_passes": cost.passes, "token_passes": cost.token_passes, "paid_passes": cost.paid_passes,
            "paid_token_passes": cost.paid_token_passes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.25,0.35")
    parser.add_argument("--draws", default="0,1,2")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--block-rivals", default="shortgpt")
    parser.add_argument("--sublayer-rivals", default="llmdrop,blockpruner")
    parser.add_argument("--block-shares", default="",
                        help="other shares of --budget for the block plan that seeds the sublayer game (rows "
                             "shapley-sublayer@S; the default row splits it in half)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    model, tokenizer = layershap.load_model()
    n = num_layers(model)
    total_parameters = sum(p.numel() for p in model.parameters())
    genres = [g for g in PACKAGED_TEXTS if g != "c4"]
    held_out = {g: text_windows(g, tokenizer, samples=args.eval_samples, seq_len=args.eval_seq_len, seed=0,
                                split="evaluation") for g in genres}
    setting = f"c4:{args.samples}x{args.seq_len}|eval:{args.eval_samples}x{args.eval_seq_len}|b{args.budget}"
    ratios = [float(r) for r in args.ratios.split(",")]
    draws = [int(d) for d in args.draws.split(",")]
    rows: list[dict] = []
    result = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "n_layers": n, "budget": args.budget,
              "genres": genres, "evaluation": {k: w.describe() for k, w in held_out.items()},
              "block_parameters": block_parameters(model), "total_parameters": total_parameters,
              "sublayer_parameters": {"attn": int(sublayer_parameters(model)[0]),
                                      "mlp": int(sublayer_parameters(model)[1])},
              "rows": rows}

    def judged(mask) -> dict:
        with keep(model, mask):
            ppl = {name: perplexity(model, w.tokens) for name, w in held_out.items()}
        params = sublayer_record(model, mask)
        return {"ppl": ppl, "geomean": geometric_mean(ppl.values()), **params,
                "parameters_kept": total_parameters - params["parameters_removed"],
                "kv_bytes_per_token": kv_bytes_per_token(model, mask)}

    for draw in draws:
        rows_path = cache / f"rows-d{draw}.json"
        done = json.loads(rows_path.read_text()) if rows_path.exists() else {}
        store = str(cache / f"store-c4-{args.samples}x{args.seq_len}-seed{draw}.sqlite")
        calibration = text_windows("c4", tokenizer, samples=args.samples, seq_len=args.seq_len, seed=draw,
                                   split="calibration")

        def row(key: str, make, draw=draw, done=done, rows_path=rows_path) -> dict:
            """A finished row from the draw's rows file, else `make()` measured now and kept."""
            full_key = f"{key}|{setting}"
            if full_key not in done:
                started = time.perf_counter()
                done[full_key] = {**make(), "draw": draw, "wall_seconds": round(time.perf_counter() - started, 1)}
                # another process may have added rows of this draw meanwhile (parts run side by side): keep them
                kept = json.loads(rows_path.read_text()) if rows_path.exists() else {}
                rows_path.write_text(json.dumps({**kept, **done}, indent=1))
            r = done[full_key]
            rows.append(r)
            print(f"draw {draw} {r['method']:20s} ratio {r['ratio']:.2f} params -{r['parameter_fraction_removed']:.3f} "
                  f"kv -{r['kv_cache_fraction_removed']:.2f} token-passes {r.get('token_passes', 0):>10,} "
                  f"geomean {r['geomean']:8.2f}", flush=True)
            write_result(args.json, {**result, "summary": summarise(rows)})
            return r

        row("dense", lambda: {"method": "dense", "ratio": 0.0, "removed": [], "forward_passes": 0, "token_passes": 0,
                              **judged(np.ones(2 * n, dtype=bool))})

        def sublayer_row(method: str, ratio: float, store=store, calibration=calibration, draw=draw,
                         block_share: float = 0.5) -> dict:
            started = time.perf_counter()
            options = ({"settings": EstimateSettings(seed=draw, budget=args.budget), "block_share": block_share}
                       if method == "shapley" else {})
            plan = select_sublayers(method, model, calibration, ratio, store=store, seed=draw, **options)
            seconds = time.perf_counter() - started
            mask = np.ones(2 * n, dtype=bool)
            mask[plan.remove] = False
            out = {"method": "shapley-sublayer" if method == "shapley" else method, "ratio": ratio, "removed": plan.details["removed_sublayers"], **cost_fields(plan),
                   "seconds": round(seconds, 1), "calibration_ppl": plan.details.get("measured_calibration_ppl"),
                   **judged(mask)}
            if "block_plan" in plan.details:
                out["block_plan"] = plan.details["block_plan"]
                out["budget_split"] = plan.details.get("budget_split")
            return out

        def block_row(method: str, ratio: float, remove=None, cost=None, store=store, calibration=calibration,
                      draw=draw) -> dict:
            k = blocks_for_parameter_ratio(ratio, n)
            started = time.perf_counter()
            fields = cost or {}
            if remove is None:
                settings = EstimateSettings(seed=draw, budget=args.budget, target_removed=k)
                plan = select_layers(method, model, calibration, k, seed=draw, store=store, settings=settings)
                remove, fields = plan.remove, cost_fields(plan)
            return {"method": f"{method}-block", "ratio": ratio, "k": k, "removed": [int(i) for i in remove], **fields,
                    "seconds": round(time.perf_counter() - started, 1), **judged(sublayer_mask_of_blocks(n, remove)),
                    "granularity": "block"}  # after judged(): its parameter record says "sublayer"

        sublayer_rivals = [m for m in args.sublayer_rivals.split(",") if m]
        for ratio in ratios:
            sub = row(f"shapley-sublayer|r{ratio}", lambda ratio=ratio: sublayer_row("shapley", ratio))
            for share in (float(x) for x in args.block_shares.split(",") if x):
                row(f"shapley-sublayer@{share}|r{ratio}", lambda ratio=ratio, share=share: {
                    **sublayer_row("shapley", ratio, block_share=share), "method": f"shapley-sublayer@{share}"})
            seed = sub["block_plan"]
            row(f"shapley-block-seed|r{ratio}",
                lambda ratio=ratio, seed=seed: {**block_row("shapley", ratio, seed["removed"], {
                    "forward_passes": seed["cost"]["passes"], "token_passes": seed["cost"]["token_passes"]}),
                    "method": "shapley-block-seed"})
            row(f"shapley-block|r{ratio}", lambda ratio=ratio: block_row("shapley", ratio))
            for method in (m for m in args.block_rivals.split(",") if m):
                row(f"{method}-block|r{ratio}", lambda method=method, ratio=ratio: block_row(method, ratio))
            for method in (m for m in sublayer_rivals if m != "blockpruner"):
                row(f"{method}|r{ratio}", lambda method=method, ratio=ratio: sublayer_row(method, ratio))
        if "blockpruner" in sublayer_rivals:  # last: hundreds of masks per ratio; 0.35 extends 0.25's steps
            for ratio in ratios:
                row(f"blockpruner|r{ratio}", lambda ratio=ratio: sublayer_row("blockpruner", ratio))
    write_result(args.json, {**result, "summary": summarise(rows)})
    for line in summarise(rows):
        print(json.dumps(line))


def summarise(rows: list[dict]) -> list[dict]:
    """Per ratio and method: mean and worst held-out geometric mean over draws, mean token-passes, what is kept."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["ratio"], r["method"]), []).append(r)
    out = []
    for (ratio, method), cell in sorted(cells.items()):
        out.append({"ratio": ratio, "method": method, "draws": sorted(r["draw"] for r in cell),
                    "mean_geomean": sum(r["geomean"] for r in cell) / len(cell),
                    "worst_geomean": max(r["geomean"] for r in cell),
                    "mean_token_passes": sum(r.get("token_passes", 0) for r in cell) / len(cell),
                    "mean_parameter_fraction_removed": sum(r["parameter_fraction_removed"] for r in cell) / len(cell),
                    "mean_kv_bytes_per_token": sum(r["kv_bytes_per_token"] for r in cell) / len(cell)})
    return out


if __name__ == "__main__":
    main()
