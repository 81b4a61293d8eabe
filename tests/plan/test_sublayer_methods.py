"""The sublayer rivals (plan/methods/llm_drop.py, plan/methods/blockpruner.py) and their registry
(plan/sublayer.py), on tiny models: scores against references computed another way, the parameter ratio
reached, protected blocks left alone, forward passes counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from layershap.errors import LayershapError
from layershap.game.layer_game import LayerGame
from layershap.models.sublayers import block_parameters, keep_sublayers, sublayer_parameters
from layershap.plan.methods.llm_drop import branch_influence
from layershap.plan.sublayer import SUBLAYER_METHODS, select_sublayers


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(1))


def reference_attention_influence(model, tokens, i: int) -> float:
    """1 - cos(h, h + a) of attn.i, with h + a read as block i's output when its MLP is skipped."""
    n = model.config.num_hidden_layers
    mask = np.ones(2 * n, dtype=bool)
    mask[2 * i + 1] = False
    with torch.inference_mode():
        h = model(input_ids=tokens, output_hidden_states=True).hidden_states[i]
        with keep_sublayers(model, mask):
            after = model(input_ids=tokens, output_hidden_states=True).hidden_states[i + 1]
    return float((1 - torch.nn.functional.cosine_similarity(h, after, dim=-1)).mean())


def test_registry_names_the_three_methods():
    assert set(SUBLAYER_METHODS) == {"shapley", "blockpruner", "llmdrop"}
    with pytest.raises(LayershapError, match="unknown sublayer method"):
        select_sublayers("sleb", None, None, 0.25)


def test_llm_drop_scores_are_the_attention_turn_of_the_stream(tokens):
    model = tiny_model("llama")
    scores = branch_influence(model, tokens)
    for i in range(5):  # the last block's output is normed in hidden_states
        assert scores[2 * i] == pytest.approx(reference_attention_influence(model, tokens, i), abs=1e-5)


def test_llm_drop_drops_least_turning_attentions_until_the_ratio(tokens):
    model = tiny_model("llama")
    plan = select_sublayers("llmdrop", model, tokens, 0.2)
    attn_share = sublayer_parameters(model)[0] / (block_parameters(model) / 6)
    assert all(j % 2 == 0 for j in plan.remove)
    assert plan.details["parameter_fraction_removed"] >= 0.2
    assert len(plan.remove) == int(np.ceil(0.2 * 6 / attn_share - 1e-9))
    kept = [j for j in range(0, 12, 2) if j not in plan.remove]
    assert max(plan.scores[j] for j in plan.remove) <= min(plan.scores[j] for j in kept)
    assert plan.forward_passes == 1 and not plan.details["mlps_needed"]
    assert plan.details["kv_cache_fraction_removed"] == len(plan.remove) / 6


def test_llm_drop_takes_mlps_only_after_every_attention_and_spares_protected(tokens):
    model = tiny_model("llama")
    plan = select_sublayers("llmdrop", model, tokens, 0.5, protect=[0])
    assert {2, 4, 6, 8, 10} <= set(plan.remove) and 0 not in plan.remove and 1 not in plan.remove
    assert plan.details["mlps_needed"] and plan.details["parameter_fraction_removed"] >= 0.5
    with pytest.raises(LayershapError, match="fewer than"):
        select_sublayers("llmdrop", model, tokens, 0.9, protect=[0, 1])


def test_blockpruner_removes_the_cheapest_sublayer_at_every_step(tokens, tmp_path):
    model = tiny_model("llama")
    plan = select_sublayers("blockpruner", model, tokens, 0.3, store=tmp_path / "s.sqlite", protect=[5])
    game = LayerGame(model, tokens, granularity="sublayer")
    mask = np.ones(12, dtype=bool)
    passes = 0
    for step in plan.details["steps"]:
        candidates = [j for j in range(10) if mask[j]]
        nlls = []
        for j in candidates:
            trial = mask.copy()
            trial[j] = False
            nlls.append(game.nll(trial))
        passes += len(candidates)
        assert step["removed"] == candidates[int(np.argmin(nlls))]
        mask[step["removed"]] = False
    assert sorted(plan.remove) == sorted(np.flatnonzero(~mask).tolist())
    assert plan.forward_passes == passes
    assert plan.details["parameter_fraction_removed"] >= 0.3
    params = sublayer_parameters(model)
    last = plan.details["steps"][-1]["removed"]  # one step fewer would not have reached the ratio
    assert params[~mask].sum() - params[last] < 0.3 * block_parameters(model)
