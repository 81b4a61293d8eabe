"""Which utility and which surrogate predict unseen masks best on the real default model.

Measures `--budget` masks of the target strata around k removed blocks, then reports the held-out r2 and
Spearman correlation of every surrogate under every utility, averaged over three splits. The choice of the
defaults (`neg_nll`, `pairwise`) in docs/method.md comes from this table.

    python benchmarks/surrogates.py --budget 94 --k 7 --json surrogates.json
"""

from __future__ import annotations

import argparse

import numpy as np
from _setup import anchors_setup, scratch_store, write_result

from layershap.estimate.pipeline import EstimateSettings, sample_masks
from layershap.estimate.surrogate import SURROGATES, held_out_fit
from layershap.game.layer_game import UTILITIES, LayerGame
from layershap.game.measure import evaluate_masks
from layershap.game.store import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--store", default=None, help="reuse this evaluation store")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, _, calibration, _ = anchors_setup()
    game = LayerGame(model, calibration)
    masks = sample_masks(EstimateSettings(budget=args.budget, target_removed=args.k), game.n_players)
    with open_store(model, scratch_store(args.store)) as store:
        nlls, evaluated, reused = evaluate_masks(game, store, masks)
    rows = []
    for utility in UTILITIES.values():
        y = np.array([utility(v, nlls[0]) for v in nlls])
        for name in SURROGATES:
            fits = [held_out_fit(name, masks, y, seed=seed) for seed in range(3)]
            rows.append({"utility": utility.name, "surrogate": name,
                         "r2": float(np.mean([f["r2"] for f in fits])),
                         "spearman": float(np.mean([f["spearman"] for f in fits]))})
            print(f"{utility.name:10s} {name:9s} r2 {rows[-1]['r2']:7.3f}  spearman {rows[-1]['spearman']:6.3f}")
    write_result(args.json, {"budget": args.budget, "k": args.k, "evaluations": evaluated, "reused": reused,
                             "rows": rows})


if __name__ == "__main__":
    main()
