"""The one-pass seed plans are exactly the ShortGPT and angular-distance plans, from one traced pass."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.data import TextWindows
from layershap.methods import select_layers
from layershap.seeds import one_pass_seeds


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
