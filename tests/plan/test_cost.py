"""Honest cost accounting: passes and token-passes, what a method used and what this run paid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.data.windows import TextWindows
from layershap.estimate.pipeline import EstimateSettings
from layershap.game.store import mask_key
from layershap.plan.methods import select_layers
from layershap.plan.methods.base import Cost
from layershap.plan.methods.sleb import sleb_passes

N, SAMPLES, SEQ = 6, 4, 16
TOKENS = SAMPLES * SEQ


@pytest.fixture(scope="module")
def windows():
    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(0))
    return TextWindows(tokens, "random", "calibration", 0)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_cost_add_and_full_size_passes():
    cost = Cost()
    cost.add(10, 7)
    cost.add(10, 3, paid=False)
    assert (cost.passes, cost.token_passes, cost.paid_passes, cost.paid_token_passes) == (2, 100, 1, 70)
    assert Cost.full_passes(2, 10, 4).token_passes == 100
    assert cost.full_size_passes(10, 9) == pytest.approx(1.0)


@pytest.mark.parametrize("method,token_passes", [
    ("shortgpt", TOKENS * (N + 1)),
    ("angular", TOKENS * (N + 1)),
    ("loo", TOKENS * ((N + 1) + N * N)),
    ("sleb", TOKENS * sum((N - t) * (N - t) for t in range(2))),  # step t: N - t trials of N - t - 1 blocks + head
    ("taylor", 2 * TOKENS * (N + 1)),
    ("magnitude", 0),
])
def test_baselines_pay_what_they_use(method, token_passes, llama, windows):
    plan = select_layers(method, llama, windows, 2)
    cost = plan.cost
    assert cost.passes == plan.forward_passes == cost.paid_passes
    assert cost.token_passes == token_passes == cost.paid_token_passes
    assert not cost.estimated
    if method == "sleb":
        assert cost.passes == sleb_passes(N, 2)


def test_shapley_uses_the_same_on_a_warm_store_and_pays_only_the_traced_pass(llama, windows, tmp_path):
    settings = EstimateSettings(budget=40, target_removed=2)
    store = tmp_path / "store.sqlite"
    cold = select_layers("shapley", llama, windows, 2, settings=settings, store=store)
    warm = select_layers("shapley", llama, windows, 2, settings=settings, store=store)
    assert cold.remove == warm.remove
    assert cold.cost.passes == warm.cost.passes == cold.forward_passes == warm.forward_passes
    assert cold.cost.token_passes == warm.cost.token_passes
    assert cold.cost.paid_passes == cold.cost.passes and cold.cost.paid_token_passes == cold.cost.token_passes
    assert warm.cost.paid_passes == 1 and warm.cost.paid_token_passes == TOKENS * (N + 1)  # the traced pass
    # token-passes no more than the budget's full-size passes (the masks can be more: most keep fewer blocks)
    assert cold.cost.full_size_passes(TOKENS, N) <= settings.budget
    assert cold.cost.token_passes < cold.cost.passes * TOKENS * (N + 1)


def test_compare_reports_cost_columns(llama, windows, tmp_path):
    from layershap.evaluate.compare_output import compare_csv, markdown_table

    plan = select_layers("loo", llama, windows, 2)
    row = {"method": "loo", "ratio": 0.33, "k": 2, "removed": plan.remove, "ppl": {"wiki": 10.0},
           "forward_passes": plan.forward_passes, "cost": vars(plan.cost), "seconds": 1.0}
    record = {"rows": [{**row, "method": "dense", "removed": [], "forward_passes": 0, "cost": None}, row]}
    csv = compare_csv(record)
    assert "token_passes,paid_passes,paid_token_passes" in csv.splitlines()[0]
    assert f",{plan.cost.token_passes},{plan.cost.paid_passes}," in csv.splitlines()[2]
    assert "token-passes (M)" in markdown_table(record)
    assert np.isfinite(plan.cost.token_passes)


def test_a_sublayer_counts_half_a_block():
    cost = Cost()
    whole = np.ones(2 * N, dtype=bool)
    one_attn_gone = whole.copy()
    one_attn_gone[0] = False
    blocks_gone = whole.copy()
    blocks_gone[[2, 3, 4, 5]] = False  # blocks 1 and 2 whole: as the block mask of 4 blocks
    cost.add_sublayer_masks([whole, one_attn_gone, blocks_gone], 10, stored={mask_key(whole)})
    assert cost.token_passes == 10 * (N + 1) + 10 * (N + 0.5) + 10 * (N - 2 + 1)
    assert (cost.passes, cost.paid_passes) == (3, 2)
    assert cost.paid_token_passes == 10 * (N + 0.5) + 10 * (N - 1)
    odd = Cost()
    odd.add_sublayer_masks([one_attn_gone], 3)  # 3 x 6.5 = 19.5, rounded up to a whole token-pass
    assert odd.token_passes == 20


def test_sublayer_rivals_count_their_cost(llama, windows, tmp_path):
    from layershap.plan.sublayer import select_sublayers

    drop = select_sublayers("llmdrop", llama, windows, 0.2)
    assert (drop.cost.passes, drop.cost.token_passes) == (1, TOKENS * (N + 1)) and not drop.cost.estimated
    store = tmp_path / "s.sqlite"
    cold = select_sublayers("blockpruner", llama, windows, 0.2, store=store)
    warm = select_sublayers("blockpruner", llama, windows, 0.2, store=store)
    assert cold.cost.passes == warm.cost.passes == cold.forward_passes
    assert cold.cost.paid_passes == cold.cost.passes and warm.cost.paid_passes == 0
    assert cold.cost.token_passes == warm.cost.token_passes
    # every blockpruner trial keeps 2n - step - 1 sublayers
    steps = [entry["candidates"] for entry in cold.details["steps"]]
    assert cold.cost.token_passes == sum(c * -(-TOKENS * (2 * N - t - 1 + 2) // 2) for t, c in enumerate(steps))
