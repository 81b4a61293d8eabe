"""What one masked evaluation costs, relative to a full forward pass, on the real default model.

- kept_fraction: blocks kept by the masks measured (the target strata around k removed blocks);
- head_fraction: the share of a full pass spent outside the blocks (embeddings, final norm, output head and
  loss), measured as a pass with every block skipped;
- skip_cost_ratio: one masked pass / one full pass, same windows; skipping is real when this is within 5% of
  head_fraction + kept_fraction * (1 - head_fraction);
- batch_cost_ratio: average time per mask over a sampled budget evaluated with every speed-up on (prefix
  sharing through `LayerGame.measure`) / one full pass. The same masks are also evaluated on the plain path
  and the NLLs compared for exact equality.

    python benchmarks/eval_cost.py --budget 256 --json eval_cost.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _setup import anchors_setup, timed_interleaved, write_result

from layershap.estimate.pipeline import EstimateSettings, sample_masks
from layershap.game.layer_game import LayerGame
from layershap.game.nll import mean_nll
from layershap.game.prefix import plain_nlls
from layershap.models.layers import keep_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, _, calibration, _ = anchors_setup()
    tokens = calibration.tokens
    n = 30

    def run(mask):
        with keep_only(model, mask):
            return mean_nll(model, tokens)

    one_mask = np.ones(n, dtype=bool)
    one_mask[np.random.default_rng(0).choice(n, args.k, replace=False)] = False
    seconds = timed_interleaved({"full": lambda: run(np.ones(n, dtype=bool)),
                                 "outside": lambda: run(np.zeros(n, dtype=bool)),
                                 "masked": lambda: run(one_mask)}, args.repeats)
    full, outside, masked = seconds["full"], seconds["outside"], seconds["masked"]
    head_fraction = outside / full
    kept = one_mask.mean()
    expected = head_fraction + kept * (1 - head_fraction)

    masks = sample_masks(EstimateSettings(budget=args.budget, target_removed=args.k), n)
    game = LayerGame(model, calibration)
    started = time.perf_counter()
    fast = np.full(len(masks), np.nan)
    for row, nll, _ in game.measure(masks):
        fast[row] = nll
    batch_seconds = time.perf_counter() - started
    check = np.arange(0, len(masks), max(1, len(masks) // 16))
    plain = plain_nlls(model, tokens, masks[check])
    exact = bool(np.array_equal(plain, fast[check]))

    result = {
        "full_pass_seconds": full,
        "kept_fraction": float(masks.mean()),
        "single_mask_kept_fraction": float(kept),
        "head_fraction": head_fraction,
        "skip_cost_ratio": masked / full,
        "skip_cost_expected": expected,
        "skip_within_5_percent": abs(masked / full - expected) <= 0.05 * expected,
        "batch_cost_ratio": batch_seconds / len(masks) / full,
        "budget": len(masks),
        "fast_path_equals_plain_path": exact,
        "masks_checked_against_plain_path": len(check),
    }
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    write_result(args.json, result)


if __name__ == "__main__":
    main()
