"""Choosing among the best measured plans: would another statistic of the calibration windows pick plans that
are better held out than the lowest calibration perplexity does?

The default method keeps the measured k-removal plan with the lowest calibration NLL. When the best plans lie
within the calibration set's noise of each other, that choice is a draw, and the winner's curse favours a
plan that the particular windows flatter. This script replays the choice with other statistics, on the same
candidates and calibration windows: for each calibration draw (C4 from `--starts`), the default method and
the ShortGPT, angular and leave-one-out baselines run at every k on one store per draw; the candidates are
the `--top` measured k-removal plans with the lowest calibration NLL plus the baselines' plans. For each
candidate, one more pass over the calibration windows gives per-token statistics (NLL; KL divergence from
the dense model's next-token distribution; cosine similarity of the final hidden state to the dense model's),
and one pass over the held-out Wikipedia windows gives the perplexity the statistic is judged by. It prints,
per draw and k, the held-out perplexity of the plan each statistic picks and its Spearman correlation with
held-out NLL over the candidates.

`--climb 12,13,14,15,16,17,18` instead hill-climbs on the held-out windows by single swaps from that removal
set (an oracle, for how far the best plans are from the held-out optimum; no method may see these windows).

    python benchmarks/selection.py --starts 0,300000,600000,900000,1200000 --json selection.json
    python benchmarks/selection.py --climb 12,13,14,15,16,17,18 --json climb.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _setup import anchors_setup, calibration_windows, write_result
from scipy.stats import spearmanr

from layershap.estimate.pipeline import EstimateSettings
from layershap.game.context import measurement_context
from layershap.game.layer_game import LayerGame
from layershap.game.measure import evaluate_masks
from layershap.game.store import mask_key, open_store
from layershap.models.layers import keep_only, num_layers
from layershap.plan.methods import select_layers
from layershap.plan.search import removal_mask, single_swaps

BASELINES = ("angular", "loo", "shortgpt")


def token_statistics(model, tokens: torch.Tensor, dense=None) -> tuple[dict, tuple]:
    """Per-token NLL, and with the dense model's (log-probabilities, final hidden states): KL(dense || this)
    and the cosine similarity of the final hidden states. Returns the statistics and this model's pair."""
    with torch.inference_mode():
        out = model(input_ids=tokens, use_cache=False, output_hidden_states=True)
        log_probs = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
        hidden = out.hidden_states[-1][:, :-1].float()
    stats = {"nll": -log_probs.gather(-1, tokens[:, 1:, None])[..., 0].double().numpy()}
    if dense is not None:
        dense_log_probs, dense_hidden = dense
        stats["kl"] = (dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(-1).double().numpy()
        stats["cosine"] = F.cosine_similarity(hidden, dense_hidden, dim=-1).double().numpy()
    return stats, (log_probs, hidden)


# Lower is better for every criterion: what a selection rule would minimise over the candidates.
CRITERIA = {
    "mean NLL (default)": lambda s: s["nll"].mean(),
    "mean KL from dense": lambda s: s["kl"].mean(),
    "1 - mean hidden cosine": lambda s: 1 - s["cosine"].mean(),
    "median window NLL": lambda s: float(np.median(s["nll"].mean(axis=1))),
    "median token NLL": lambda s: float(np.median(s["nll"])),
    "NLL without the worst 10% of tokens": lambda s: np.sort(s["nll"].ravel())[: int(0.9 * s["nll"].size)].mean(),
}


class HeldOut:
    """Held-out mean NLL of keep-masks, measured once (prefix sharing) into a store of their own, so that
    draws and reruns share them."""

    def __init__(self, model, evaluation, store: Path):
        self.game = LayerGame(model, evaluation)
        self.store = open_store(model, store)

    def __call__(self, masks) -> np.ndarray:
        return evaluate_masks(self.game, self.store, np.array(masks), description="held-out perplexity")[0]


def replay_draw(model, calibration, held_out: HeldOut, ks, top: int, store: Path) -> list[dict]:
    """One calibration draw: run the methods, gather the candidates, score them with every criterion."""
    plans = {}
    for k in ks:
        for method in ("shapley", *BASELINES):
            plan = select_layers(method, model, calibration, k, settings=EstimateSettings(budget=256, target_removed=k),
                                 store=store, budget=256)
            plans[method, k] = [int(i) for i in plan.remove]
    with open_store(model, store) as db:
        measured = db.all_nlls(measurement_context(LayerGame(model, calibration)))
    _, dense = token_statistics(model, calibration.tokens)
    n, rows = num_layers(model), []
    for k in ks:
        ranked = sorted((nll, key) for key, nll in measured.items() if key.count("0") == k and math.isfinite(nll))
        baseline_keys = {m: mask_key(removal_mask(n, plans[m, k])) for m in BASELINES}
        keys = [key for _, key in ranked[:top]]
        keys += [key for key in dict.fromkeys(baseline_keys.values()) if key not in keys]
        masks = [np.array([c == "1" for c in key]) for key in keys]
        stats = []
        for mask in masks:
            with keep_only(model, mask):
                stats.append(token_statistics(model, calibration.tokens, dense)[0])
        held = held_out(masks)
        row = {"k": k, "candidates": [list(map(int, np.flatnonzero(~m))) for m in masks],
               "held_out_ppl": np.exp(held).tolist(), "plans": {m: plans[m, k] for m in ("shapley", *BASELINES)},
               "picks": {}, "spearman": {}}
        for name, criterion in CRITERIA.items():
            values = [float(criterion(s)) for s in stats]
            row["picks"][name] = float(math.exp(held[int(np.argmin(values))]))
            row["spearman"][name] = float(spearmanr(values, held)[0])
        row["best_candidate"] = float(math.exp(held.min()))
        row["baselines"] = {m: float(math.exp(held[keys.index(key)])) for m, key in baseline_keys.items()}
        rows.append(row)
    return rows


def climb(held_out, start: list[int], n: int) -> dict:
    """Move to the best single swap (one removed block kept, one kept block removed) while held-out NLL
    falls; `held_out` maps keep-masks to NLLs."""
    best = removal_mask(n, start)
    best_nll = float(held_out([best])[0])
    path = [(start, math.exp(best_nll))]
    while True:
        swaps = list(single_swaps(best, np.arange(n)))
        nlls = held_out(swaps)
        top = int(np.argmin(nlls))
        if nlls[top] >= best_nll:
            break
        best, best_nll = swaps[top], float(nlls[top])
        path.append((list(map(int, np.flatnonzero(~best))), math.exp(best_nll)))
        print(f"moved to {path[-1][0]}: held-out ppl {path[-1][1]:.2f}", flush=True)
    return {"path": path, "optimum": path[-1][0], "optimum_ppl": path[-1][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", default="0,300000,600000", help="C4 characters the calibration draws start at")
    parser.add_argument("--ks", default="7,10")
    parser.add_argument("--top", type=int, default=12, help="measured plans per k, lowest calibration NLL first")
    parser.add_argument("--store-dir", default="benchmarks/.cache/selection", help="one evaluation store per draw")
    parser.add_argument("--climb", default="", help="removal set to hill-climb from on the held-out windows")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tokenizer, _, evaluation = anchors_setup()
    held_out = HeldOut(model, evaluation, Path(args.store_dir) / "held-out-wiki.sqlite")
    if args.climb:
        write_result(args.json, climb(held_out, [int(v) for v in args.climb.split(",")], num_layers(model)))
        return
    result = {"draws": []}
    for start in (int(v) for v in args.starts.split(",")):
        store = Path(args.store_dir) / f"c4-{start}.sqlite"  # open_store creates the directory
        rows = replay_draw(model, calibration_windows(tokenizer, start), held_out, [int(v) for v in args.ks.split(",")],
                           args.top, store)
        result["draws"].append({"calibration_start": start, "rows": rows})
        for row in rows:
            picks = "  ".join(f"{name}: {ppl:.2f}" for name, ppl in row["picks"].items())
            print(f"C4@{start} k={row['k']}  best candidate {row['best_candidate']:.2f}  {picks}", flush=True)
        if args.json:  # after every draw, so that a run stopped early keeps what it measured
            write_result(args.json, result)
    write_result(args.json, result)


if __name__ == "__main__":
    main()
