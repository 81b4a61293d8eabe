"""benchmarks/selection.py: its per-token statistics agree with the library's perplexity and are zero-distance
for the dense model itself, and its held-out hill climb finds the optimum of a game it can check."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tiny_models import VOCAB, tiny_model

from layershap.game.nll import mean_nll
from layershap.models.layers import keep_only

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import selection as bench


def test_token_statistics_match_mean_nll_and_vanish_for_the_dense_model():
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    dense_stats, dense = bench.token_statistics(model, tokens)
    assert abs(dense_stats["nll"].mean() - mean_nll(model, tokens)) < 1e-6
    itself, _ = bench.token_statistics(model, tokens, dense)
    np.testing.assert_allclose(itself["kl"], 0, atol=1e-6)
    np.testing.assert_allclose(itself["cosine"], 1, atol=1e-6)
    with keep_only(model, [True, False, True, True, False, True]):
        pruned, _ = bench.token_statistics(model, tokens, dense)
        assert abs(pruned["nll"].mean() - mean_nll(model, tokens)) < 1e-6
    assert pruned["kl"].min() >= -1e-6 and pruned["kl"].mean() > 1e-4  # KL(dense || pruned) >= 0, and > 0 here
    assert pruned["cosine"].mean() < 1 - 1e-4
    criteria = {name: float(fn(pruned)) for name, fn in bench.CRITERIA.items()}
    assert criteria["mean NLL (default)"] == pruned["nll"].mean()
    assert criteria["median token NLL"] <= pruned["nll"].max()


def test_climb_reaches_the_optimum_of_an_additive_game():
    """Held-out NLL = the summed damage of the removed blocks: the best 3-removal is the 3 least damaging,
    and single swaps reach it from any start."""
    damage = np.array([5.0, 0.1, 3.0, 0.3, 4.0, 0.2, 2.0, 6.0])
    result = bench.climb(lambda masks: np.array([damage[~m].sum() for m in masks]), [0, 4, 7], len(damage))
    assert sorted(result["optimum"]) == [1, 3, 5]
    assert abs(result["optimum_ppl"] - np.exp(0.6)) < 1e-9
    assert [ppl for _, ppl in result["path"]] == sorted((ppl for _, ppl in result["path"]), reverse=True)
