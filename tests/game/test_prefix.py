"""Prefix sharing must give exactly the plain path's NLLs (and KLs), on every family, in any mask order."""

import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIGS, VOCAB, tiny_model

from layershap.game.kl import dense_reference
from layershap.game.layer_game import LayerGame
from layershap.game.prefix import PrefixSharingEvaluator, plain_nlls, visiting_order


def _masks(n, count, seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((count, n)) < 0.7
    masks[0] = True
    masks[1] = False  # the empty model: nothing to resume into
    masks[2, :] = True
    masks[2, -1] = False  # resume at the very end
    masks[3] = masks[4]  # a repeated mask
    return masks


def _model_and_tokens(family):
    """A tiny model of the family (RWKV as load_model leaves it) and 5 random windows of 20 tokens."""
    model = tiny_model(family)
    if family == "rwkv":
        model.config.rescale_every = 0  # as load_model leaves it
    tokens = torch.randint(0, VOCAB, (5, 20), generator=torch.Generator().manual_seed(0))
    return model, tokens


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_prefix_sharing_equals_plain_path(family):
    model, tokens = _model_and_tokens(family)
    masks = _masks(6, 24, seed=1)
    plain = plain_nlls(model, tokens, masks, batch_size=2)
    evaluator = PrefixSharingEvaluator(model, tokens, batch_size=2)
    seen = []
    shared = evaluator.nlls(masks, on_result=lambda i, v: seen.append(i))
    np.testing.assert_array_equal(shared, plain)
    assert sorted(seen) == list(range(len(masks)))
    if evaluator.enabled:
        assert evaluator.blocks_run < int(masks.sum())


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_prefix_sharing_equals_plain_path_for_kl(family):
    model, tokens = _model_and_tokens(family)
    reference = dense_reference(model, tokens, batch_size=2)
    masks = _masks(6, 16, seed=1)
    plain = plain_nlls(model, tokens, masks, batch_size=2, loss=reference)
    evaluator = PrefixSharingEvaluator(model, tokens, batch_size=2, loss=reference)
    np.testing.assert_array_equal(evaluator.nlls(masks), plain)
    full = masks.all(axis=1)
    assert (plain[full] == 0.0).all() and (plain[~full] > 0).all()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_prefix_sharing_equals_plain_path_for_kl_on_sublayer_masks(family):
    model = tiny_model(family)
    tokens = torch.randint(0, VOCAB, (5, 20), generator=torch.Generator().manual_seed(0))
    game = LayerGame(model, tokens, utility="kl", batch_size=2, granularity="sublayer")
    masks = _masks(12, 16, seed=3)
    shared = np.full(len(masks), np.nan)
    for row, value, _ in game.measure(masks):
        shared[row] = value
    plain = plain_nlls(model, tokens, masks, batch_size=2, loss=game.reference)
    np.testing.assert_array_equal(shared, plain)
    assert game._prefix.enabled and shared[0] == 0.0


def test_visiting_order_groups_shared_prefixes():
    masks = np.array([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=bool)
    ordered = masks[visiting_order(masks)]
    assert ordered.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]


def test_cache_limit_falls_back_to_plain():
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (2, 8))
    evaluator = PrefixSharingEvaluator(model, tokens, max_cache_bytes=1)
    masks = _masks(6, 6, seed=2)
    assert not evaluator.enabled
    np.testing.assert_array_equal(evaluator.nlls(masks), plain_nlls(model, tokens, masks))


def test_cache_budget_is_fixed_on_the_host_and_a_share_of_free_memory_on_a_gpu(monkeypatch):
    from layershap.game import prefix

    assert prefix.cache_budget_bytes(torch.device("cpu")) == prefix.DEFAULT_CACHE_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 << 30, 140 << 30))
    assert prefix.cache_budget_bytes(torch.device("cuda")) == 25 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 140 << 30))
    assert prefix.cache_budget_bytes(torch.device("cuda")) == 1 << 28  # a nearly full GPU: less than on the host


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2", "opt", "gpt_neox"])
def test_prefix_sharing_equals_plain_path_on_sublayer_masks(family):
    model = tiny_model(family)
    tokens = torch.randint(0, VOCAB, (5, 20), generator=torch.Generator().manual_seed(0))
    masks = _masks(12, 24, seed=3)
    masks[5] = np.repeat(masks[6].reshape(6, 2)[:, 0], 2)  # whole blocks only
    plain = plain_nlls(model, tokens, masks, batch_size=2)
    evaluator = PrefixSharingEvaluator(model, tokens, batch_size=2)
    shared = evaluator.nlls(masks)
    np.testing.assert_array_equal(shared, plain)
    assert evaluator.enabled and evaluator.blocks_run < int(masks.reshape(24, 6, 2).any(axis=2).sum())
    # a block mask after sublayer masks does not resume from a sublayer path
    block = masks[0].reshape(6, 2)[:, 0].copy()
    block[2] = False
    np.testing.assert_array_equal(evaluator.nlls(block[None]), plain_nlls(model, tokens, block[None], batch_size=2))


class _Injected(RuntimeError):
    pass


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_failure_mid_pass_leaves_no_wrong_state_behind(family):
    """A pass that raises after some window batches already hold the new mask's states (an out-of-memory
    error, Ctrl-C, a caller that catches and goes on) must not let the next mask resume from them."""
    model = tiny_model(family)
    tokens = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(3))
    evaluator = PrefixSharingEvaluator(model, tokens, batch_size=2)  # three batches per pass
    assert evaluator.enabled
    full = np.ones(6, dtype=bool)
    failing = full.copy()
    failing[1] = False  # resumes at depth 1, rewrites the states at depths 2..6 batch by batch
    after = [full.copy(), full.copy()]
    after[0][4] = False  # resumes at depth 4 of the full model's path, which the failing pass overwrote
    after[1][3] = False
    assert evaluator.nll(full) == plain_nlls(model, tokens, [full], batch_size=2)[0]

    from layershap.models.layers import block_list

    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:  # the third batch, after two batches have stored the failing mask's states
            raise _Injected("injected failure")

    handle = block_list(model)[4].register_forward_hook(explode)
    try:
        with pytest.raises(_Injected):
            evaluator.nll(failing)
    finally:
        handle.remove()
    assert calls["n"] == 3
    values = [evaluator.nll(mask) for mask in [*after, failing, full]]
    expected = plain_nlls(model, tokens, [*after, failing, full], batch_size=2)
    np.testing.assert_array_equal(np.array(values), expected)
