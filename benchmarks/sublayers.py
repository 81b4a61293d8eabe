"""Sublayers against blocks: held-out perplexity of the sublayer plan (`--granularity sublayer`), of the block
plan of the same parameter ratio, and of rivals, on several held-out genres, with the forward passes each spent
and the KV-cache share each removes.

Default model (SmolLM2-135M-Instruct); calibration: `--samples` windows of `--seq-len` tokens of the
calibration half of C4 (as `layershap prune`); evaluation: the evaluation half of every `--eval-data` text.
Rows:

- `shapley-sublayer`: `plan/sublayer.py` (2n players, parameter ratio) at `--budget`, which it splits: half
  for the block plan that seeds it, half for the sublayer game (`split_budget`; before that split each game
  spent the whole `--budget`, so rows measured then at B match `--budget 2B` now);
- `shapley-block`: the block plan it is seeded with, the fewest blocks whose parameters reach the ratio
  (its forward passes are part of the sublayer plan's);
- `--block-rivals` (default shortgpt): block methods at the same number of blocks;
- `--sublayer-rivals` (default llmdrop; blockpruner is available but needs about K x 2n passes).

The evaluation store of each ratio lives under `--cache` (default benchmarks/.cache/sublayers/), and every
finished row is kept in `rows.json` there under a key of its settings, so a rerun with the same settings
measures nothing again and one with a larger budget pays only for new masks. A row measured on a store that
already held masks says `store_reused: true` (its forward passes then undercount).

    python benchmarks/sublayers.py --ratios 0.25 --budget 128 --eval-samples 8 --json sublayers.json
    python benchmarks/sublayers.py --ratios 0.25,0.35 --budget 128 --sublayer-rivals llmdrop,blockpruner
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _setup import write_result

import layershap
from layershap.data.windows import text_windows
from layershap.estimate.pipeline import EstimateSettings
from layershap.game.nll import perplexity
from layershap.models.layers import num_layers
from layershap.models.sublayers import block_parameters, keep, sublayer_parameters
from layershap.plan.methods import select_layers
from layershap.plan.methods._sublayers import sublayer_record
from layershap.plan.sublayer import blocks_for_parameter_ratio, select_sublayers, sublayer_mask_of_blocks

CACHE = Path(__file__).parent / ".cache" / "sublayers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.25")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-data", default="wiki,code,technical")
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--block-rivals", default="shortgpt")
    parser.add_argument("--sublayer-rivals", default="llmdrop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows_path = cache / "rows.json"
    done = json.loads(rows_path.read_text()) if rows_path.exists() else {}

    model, tokenizer = layershap.load_model()
    n = num_layers(model)
    calibration = text_windows("c4", tokenizer, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                               split="calibration")
    held_out = {name: text_windows(name, tokenizer, samples=args.eval_samples, seq_len=args.eval_seq_len,
                                   seed=args.seed, split="evaluation") for name in args.eval_data.split(",")}
    windows = f"c4:{args.samples}x{args.seq_len}|eval:{args.eval_data}:{args.eval_samples}x{args.eval_seq_len}"
    rows: list[dict] = []
    result = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "n_layers": n, "budget": args.budget,
              "calibration": calibration.describe(), "evaluation": {k: w.describe() for k, w in held_out.items()},
              "block_parameters": block_parameters(model),
              "sublayer_parameters": {"attn": int(sublayer_parameters(model)[0]),
                                      "mlp": int(sublayer_parameters(model)[1])},
              "rows": rows}

    def held_out_ppl(mask) -> dict:
        with keep(model, mask):
            return {name: perplexity(model, w.tokens) for name, w in held_out.items()}

    def row(key: str, make) -> dict:
        """A finished row from rows.json, else `make()` measured now and kept."""
        full_key = f"{key}|{windows}|seed{args.seed}"
        if full_key not in done:
            started = time.perf_counter()
            done[full_key] = {**make(), "wall_seconds": time.perf_counter() - started}
            rows_path.write_text(json.dumps(done, indent=1))
        rows.append(done[full_key])
        r = done[full_key]
        ppl = " ".join(f"{k} {v:8.2f}" for k, v in r["ppl"].items())
        print(f"{r['method']:18s} ratio {r['ratio']:.2f} params {r.get('parameter_fraction_removed', 0):.3f} "
              f"kv {r.get('kv_cache_fraction_removed', 0):.2f} masks {r.get('masks_used', r['forward_passes']):5d}  {ppl}", flush=True)
        write_result(args.json, result)
        return r

    row("dense", lambda: {"method": "dense", "ratio": 0.0, "removed": [], "forward_passes": 0,
                          "ppl": held_out_ppl(np.ones(2 * n, dtype=bool)), "parameter_fraction_removed": 0.0,
                          "kv_cache_fraction_removed": 0.0})
    for ratio in (float(r) for r in args.ratios.split(",")):
        store = cache / f"store-c4-{args.samples}x{args.seq_len}-seed{args.seed}-r{ratio}.sqlite"
        k_block = blocks_for_parameter_ratio(ratio, n)
        settings = EstimateSettings(seed=args.seed, budget=args.budget)

        # the loop's values bound as defaults: each row is built within its own iteration
        def sublayer_row(method: str, store=store, ratio=ratio, **options) -> dict:
            reused = store.exists()
            started = time.perf_counter()
            plan = select_sublayers(method, model, calibration, ratio, store=store, seed=args.seed, **options)
            mask = np.ones(2 * n, dtype=bool)
            mask[plan.remove] = False
            return {"method": f"{method}-sublayer" if method == "shapley" else method, "granularity": "sublayer",
                    "ratio": ratio, "removed": plan.details["removed_sublayers"], **sublayer_record(model, mask),
                    "forward_passes": plan.forward_passes, "seconds": time.perf_counter() - started,
                    "masks_used": _masks_used(plan),
                    "store_reused": reused, "ppl": held_out_ppl(mask),
                    "calibration_ppl": plan.details.get("measured_calibration_ppl"),
                    "block_plan": plan.details.get("block_plan")}

        sub = row(f"shapley-sublayer|r{ratio}|b{args.budget}",
                  lambda settings=settings: sublayer_row("shapley", settings=settings))

        def block_row(method: str, plan_remove=None, passes=None, store=store, ratio=ratio, settings=settings,
                      k_block=k_block) -> dict:
            started = time.perf_counter()
            if plan_remove is None:
                plan = select_layers(method, model, calibration, k_block, seed=args.seed, store=store,
                                     settings=replace(settings, target_removed=k_block))
                plan_remove, passes = plan.remove, plan.forward_passes
            mask = sublayer_mask_of_blocks(n, plan_remove)
            return {"method": f"{method}-block", "granularity": "block", "ratio": ratio, "k": k_block,
                    "removed": [int(i) for i in plan_remove], **sublayer_record(model, mask),
                    "forward_passes": passes, "seconds": time.perf_counter() - started, "ppl": held_out_ppl(mask)}

        block = sub["block_plan"]
        row(f"shapley-block|r{ratio}|b{args.budget}",
            lambda block=block: {**block_row("shapley", block["removed"], block["forward_passes"]),
                     "masks_used": block["masks_used"],
                     "calibration_ppl": block["measured_calibration_ppl"]})
        for method in (m for m in args.block_rivals.split(",") if m):
            row(f"{method}-block|r{ratio}|b{args.budget}", lambda method=method: block_row(method))
        for method in (m for m in args.sublayer_rivals.split(",") if m):
            row(f"{method}|r{ratio}", lambda method=method: sublayer_row(method))
    write_result(args.json, result)


def _masks_used(plan) -> int:
    """The distinct plans a method measured, whether or not the store already held them (the honest cost on a
    fresh store): the sublayer game's masks plus its block plan's, BlockPruner's trials, a traced pass."""
    details = plan.details
    if "masks_used" in details:
        return int(details["masks_used"]) + int(details["block_plan"]["masks_used"])
    return plan.forward_passes


if __name__ == "__main__":
    main()
