"""plan/sublayer.py's plan over 2n players: what it cost, used and paid, block plan included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.data.windows import TextWindows
from layershap.estimate.pipeline import EstimateSettings
from layershap.plan.sublayer import select_sublayers

N, SAMPLES, SEQ = 6, 2, 16
TOKENS = SAMPLES * SEQ


@pytest.fixture(scope="module")
def windows():
    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(0))
    return TextWindows(tokens, "random", "calibration", 0)


def test_sublayer_plan_uses_the_same_on_a_warm_store_and_says_what_it_paid(windows, tmp_path):
    model = tiny_model("llama")
    settings = EstimateSettings(budget=40)
    store = tmp_path / "store.sqlite"
    cold = select_sublayers("shapley", model, windows, 0.25, settings=settings, store=store)
    warm = select_sublayers("shapley", model, windows, 0.25, settings=settings, store=store)
    assert cold.remove == warm.remove
    assert cold.forward_passes == cold.cost.passes == warm.cost.passes == warm.forward_passes
    assert cold.cost.token_passes == warm.cost.token_passes and not cold.cost.estimated
    assert (cold.cost.paid_passes, cold.cost.paid_token_passes) == (cold.cost.passes, cold.cost.token_passes)

    block = cold.details["block_plan"]["cost"]
    sublayer_passes = cold.cost.passes - block["passes"]
    assert sublayer_passes == cold.details["masks_used"] == cold.details["sublayer_masks_paid"]
    # the sublayer masks: at most the full model each, at least the head alone
    sublayer_tokens = cold.cost.token_passes - block["token_passes"]
    assert sublayer_passes * TOKENS < sublayer_tokens < sublayer_passes * TOKENS * (N + 1)

    warm_block = warm.details["block_plan"]["cost"]
    assert warm.cost.paid_passes == warm_block["paid_passes"] == 1  # only the block plan's traced pass
    assert warm.details["sublayer_masks_paid"] == 0
    assert warm.cost.paid_token_passes == TOKENS * (N + 1)
    assert np.isfinite(cold.details["measured_calibration_ppl"])


def test_sublayer_search_spends_the_budget_in_full_size_passes(windows, tmp_path):
    from layershap.estimate.budget import mask_share

    model = tiny_model("llama")
    for unit, total in (("full_passes", 80), ("masks", 80)):
        settings = EstimateSettings(budget=total, budget_unit=unit)
        plan = select_sublayers("shapley", model, windows, 0.25, settings=settings, store=tmp_path / f"{unit}.sqlite")
        # one --budget: half for the block plan's game, half for the sublayer game
        assert plan.details["budget_split"] == {"block_plan": total // 2, "sublayer_game": total - total // 2}
        budget = plan.details["budget_split"]["sublayer_game"]
        spent = plan.details["sublayer_budget_spent"]
        # the rounds stop once no further plan fits: a plan keeps at least half the model here
        assert budget - mask_share(N, unit)(np.ones(2 * N, dtype=bool)) < spent <= budget + 1e-9
        if unit == "masks":
            assert plan.details["masks_used"] == spent
        else:  # each mask keeps less than the full model, so the budget buys more masks than its size
            assert plan.details["masks_used"] > budget


def test_one_budget_is_split_and_refused_when_too_small_for_both_parts():
    from layershap.errors import LayershapError
    from layershap.plan.sublayer import split_budget

    assert split_budget(256, "shapley") == (128, 128)
    assert split_budget(128, "shapley", 0.25) == (32, 96)  # another share, for benchmarks/sublayers.py
    assert split_budget(41, "kernelshap") == (20, 21)
    assert split_budget(20, "shortgpt") == (0, 20)  # a block method that spends no budget leaves it all
    with pytest.raises(LayershapError, match="give at least 40"):
        split_budget(39, "shapley")
