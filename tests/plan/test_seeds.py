"""The seed plans are exactly the baselines' plans: ShortGPT and angular distance from one traced pass,
leave-one-out from the target sampler's first masks."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.data.windows import TextWindows
from layershap.estimate.pipeline import EstimateSettings, sample_masks
from layershap.game.layer_game import LayerGame
from layershap.plan.methods import select_layers
from layershap.plan.seeds import leave_one_out_seed, one_pass_seeds


@pytest.fixture(scope="module")
def windows():
    return TextWindows(torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1)),
                       "random", "calibration", 0)


@pytest.mark.parametrize("family", ["llama", "mamba"])
@pytest.mark.parametrize("protect", [(), (2,)])
def test_seeds_are_the_shortgpt_and_angular_plans(family, protect, windows):
    model = tiny_model(family)
    seeds = one_pass_seeds(model, windows, 2, protect=protect)
    expected = [select_layers(name, model, windows, 2, protect=protect).remove for name in ("shortgpt", "angular")]
    unique = [plan for i, plan in enumerate(expected) if plan not in expected[:i]]
    assert seeds == unique


def test_no_seeds_for_zero_removals(windows):
    assert one_pass_seeds(tiny_model("llama"), windows, 0) == []


@pytest.mark.parametrize("protect", [(), (0, 3)])
def test_leave_one_out_seed_is_the_loo_plan_from_the_estimate_masks(protect, windows):
    model = tiny_model("llama")
    n = 6
    masks = sample_masks(EstimateSettings(budget=n + 3, target_removed=2), n)  # full, n single removals, 2 more
    game = LayerGame(model, windows)
    nlls = [game.nll(m) for m in masks]
    assert leave_one_out_seed(masks, nlls, 2, protect=protect) == select_layers("loo", model, windows, 2,
                                                                                protect=protect).remove


def test_no_leave_one_out_seed_without_every_single_removal():
    masks = sample_masks(EstimateSettings(budget=5, target_removed=2), 6)  # full + 4 of the 6 single removals
    assert leave_one_out_seed(masks, [1.0] * len(masks), 2) is None
    full_set = sample_masks(EstimateSettings(budget=7, target_removed=2), 6)
    assert leave_one_out_seed(full_set, [1.0] * 7, 0) is None
