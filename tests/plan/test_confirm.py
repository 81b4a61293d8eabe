"""Screening and confirmation: finalists re-measured on fresh windows by successive halving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.data.windows import TextWindows
from layershap.estimate.pipeline import EstimateSettings
from layershap.game.layer_game import LayerGame
from layershap.game.store import EvaluationStore
from layershap.plan.confirm import confirmation_cost, finalists, pool_samples, successive_halving
from layershap.plan.methods import select_layers
from layershap.plan.search import removal_mask

N, SEQ = 6, 16


def random_windows(samples: int, seed: int) -> TextWindows:
    tokens = torch.randint(0, VOCAB, (samples, SEQ), generator=torch.Generator().manual_seed(seed))
    return TextWindows(tokens, "random", "calibration", seed, starts=tuple(("random", i * SEQ) for i in range(samples)))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_pool_and_cost():
    assert pool_samples(8, 3) == 56
    # 8 plans on 1x, 4 on 2x, 2 on 4x the tokens; 7 of 31 blocks removed
    assert confirmation_cost(8, 3, 30, 7) == pytest.approx((8 + 8 + 8) * 24 / 31)
    assert confirmation_cost(1, 3, 30, 7) == 0
    assert confirmation_cost(5, 1, 30, 7) == pytest.approx(5 * 24 / 31)
    # the KL loss: each round runs the full model once more over its windows for the dense reference
    assert confirmation_cost(8, 3, 30, 7, reference=True) == pytest.approx((8 + 8 + 8) * 24 / 31 + 1 + 2 + 4)


def test_finalists_are_the_best_measured_then_the_seeds():
    masks = np.array([removal_mask(N, r) for r in ([], [0, 1], [1, 2], [2, 3], [0], [3, 4])])
    nlls = np.array([1.0, 3.0, 2.0, 2.5, 1.5, 9.0])
    chosen = finalists(masks, nlls, 2, (), 1.0, seeds=[[4, 5], [1, 2]], measured=2)
    assert [list(np.flatnonzero(~m)) for m in chosen] == [[1, 2], [2, 3], [4, 5]]


def test_successive_halving_keeps_the_best_pooled_plan(llama, tmp_path):
    candidates = [removal_mask(N, r) for r in ([0, 1], [1, 2], [2, 3], [3, 4], [4, 5])]
    fresh = random_windows(pool_samples(2, 3), seed=7)
    with EvaluationStore(tmp_path / "s.sqlite", model_fp="m", n_layers=N) as store:
        result = successive_halving(llama, fresh, candidates, store, samples=2)
        again = successive_halving(llama, fresh, candidates, store, samples=2)
    assert [r["windows"] for r in result.rounds] == [2, 4, 8]
    assert [len(r["plans"]) for r in result.rounds] == [5, 3, 2]
    # pooled NLL of each survivor of the last round, measured directly
    last = [r["remove"] for r in result.rounds[-1]["plans"]]
    pooled = {}
    for remove in last:
        game = LayerGame(llama, fresh.tokens[:14])
        pooled[tuple(remove)] = game.nll(removal_mask(N, remove))
    assert list(np.flatnonzero(~result.winner)) == list(min(pooled, key=pooled.get))
    assert result.cost.passes == 10 and result.cost.paid_passes == 10
    assert result.cost.token_passes == (5 * 2 + 3 * 4 + 2 * 8) * SEQ * (N - 2 + 1)
    assert again.cost.paid_passes == 0 and again.cost.passes == 10
    assert np.array_equal(again.winner, result.winner)


def test_shapley_with_confirmation_stays_in_budget_and_records_the_rounds(llama, tmp_path):
    calibration = random_windows(2, seed=1)
    fresh = random_windows(pool_samples(2, 2), seed=2)
    settings = EstimateSettings(budget=40, target_removed=2, confirm=2)
    plan = select_layers("shapley", llama, calibration, 2, settings=settings, store=tmp_path / "s.sqlite",
                         confirmation_windows=fresh)
    confirmation = plan.details["confirmation"]
    assert confirmation["chosen"] == plan.remove
    assert plan.remove in [p["remove"] for p in confirmation["rounds"][0]["plans"]]
    assert plan.cost.full_size_passes(calibration.tokens.numel(), N) <= settings.budget
    plain = select_layers("shapley", llama, calibration, 2, settings=EstimateSettings(budget=40, target_removed=2),
                          store=tmp_path / "t.sqlite")
    assert "confirmation" not in plain.details
    skipped = select_layers("shapley", llama, calibration, 2, settings=settings, store=tmp_path / "u.sqlite")
    assert "skipped" in skipped.details["confirmation"]


def test_confirm_setting_is_checked():
    from layershap.errors import LayershapError

    with pytest.raises(LayershapError, match="--confirm"):
        EstimateSettings(confirm=-1).check(N)
    assert EstimateSettings(confirm=3).confirm == 3
