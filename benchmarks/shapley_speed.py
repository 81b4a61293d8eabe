"""Shapley values from a surrogate: layershap's batched estimator against the official per-sample loop.

The official code (step 3 of `sharpley_agent_ppl.py`) draws base masks from its strata and, for every layer
and every base mask, calls the MLP twice on a single row: 2 x 32 x 80,000 = 5.1 million calls for 32 layers.
This script re-implements that loop faithfully and times it on `--official-samples` base masks per layer
(the cost is linear in that number, so the full run's time is extrapolated unless `--official-samples 80000`
is given), and times layershap's `sampled_shapley` on the same paper MLP with 80,000 samples per player,
both in one process.

    python benchmarks/shapley_speed.py --json shapley_speed.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _setup import write_result

from layershap.estimate.sampling import paper_sizes, stratified_masks
from layershap.estimate.shapley import sampled_shapley
from layershap.estimate.surrogate import PaperMLP


def official_loop(network: torch.nn.Module, base_masks: np.ndarray, n: int) -> np.ndarray:
    """One layer at a time, one base mask at a time, one row per call: the official step 3."""
    values = []
    with torch.no_grad():
        for layer in range(n):
            total = 0.0
            for base in base_masks:
                with_layer, without_layer = base.copy(), base.copy()
                with_layer[layer], without_layer[layer] = 1, 0
                total += (network(torch.tensor(with_layer, dtype=torch.float32).unsqueeze(0)).item()
                          - network(torch.tensor(without_layer, dtype=torch.float32).unsqueeze(0)).item())
            values.append(total / len(base_masks))
    return np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--players", type=int, default=32)
    parser.add_argument("--samples", type=int, default=80_000, help="samples per player, both estimators")
    parser.add_argument("--official-samples", type=int, default=2_000, help="base masks actually timed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = args.players
    rng = np.random.default_rng(0)
    masks = rng.random((600, n)) < 0.75
    y = 1.0 / (1.0 + np.exp(-(masks.sum(axis=1) - 0.7 * n) / 3.0))
    surrogate = PaperMLP(n, seed=0, epochs=20).fit(masks, y)
    network = surrogate.net

    base = stratified_masks(n, args.official_samples, paper_sizes(n), seed=0).astype(np.int8)
    started = time.perf_counter()
    official_loop(network, base, n)
    official_measured = time.perf_counter() - started
    official_full = official_measured * args.samples / args.official_samples

    started = time.perf_counter()
    sampled_shapley(surrogate.predict, n, samples_per_player=args.samples, seed=0)
    ours = time.perf_counter() - started
    speedup = official_full / ours
    print(f"official loop: {official_measured:.1f} s for {args.official_samples} base masks per layer "
          f"-> {official_full:.0f} s for {args.samples}")
    print(f"layershap sampled_shapley: {ours:.2f} s for {args.samples} samples per player")
    print(f"speedup: {speedup:.0f}x")
    write_result(args.json, {"players": n, "samples_per_player": args.samples,
                             "official_samples_timed": args.official_samples,
                             "official_seconds_measured": official_measured,
                             "official_seconds": official_full, "layershap_seconds": ours, "speedup": speedup,
                             "extrapolated": args.official_samples != args.samples})


if __name__ == "__main__":
    main()
