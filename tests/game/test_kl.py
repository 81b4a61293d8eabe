"""The KL loss (`--utility kl`): the coarsened KL against brute force, 0 for the full model, and its own store
context (its plain and prefix-sharing paths agree: tests/game/test_prefix.py)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.data.windows import TextWindows
from layershap.errors import LayershapError
from layershap.game.context import context_description, context_key, measurement_context
from layershap.game.kl import KL_TOP_K, dense_reference
from layershap.game.layer_game import LayerGame, get_utility
from layershap.game.measure import Measured, evaluate_masks
from layershap.game.nll import mean_loss
from layershap.game.store import open_store


class Bigram(torch.nn.Module):
    """A language model whose next-token logits are a fixed table row per input token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def _brute_force(p_logits, q_logits, tokens, k):
    """Mean over predicted positions of KL(P || Q), P and Q coarsened onto p's top k tokens and the rest, in
    float64 by subtraction from 1 (fine in float64 at this size)."""
    total, count = 0.0, 0
    for window in tokens:
        for token in window[:-1]:
            p = torch.softmax(p_logits[token].double(), -1)
            q = torch.softmax(q_logits[token].double(), -1)
            top = torch.topk(p, min(k, len(p))).indices
            P = torch.cat([p[top], (1 - p[top].sum()).clamp_min(0)[None]])
            Q = torch.cat([q[top], (1 - q[top].sum()).clamp_min(0)[None]])
            total += float(sum(a * math.log(a / b) for a, b in zip(P.tolist(), Q.tolist()) if a > 1e-15))
            count += 1
    return total / count


def _exact_kl(p_logits, q_logits, tokens):
    total, count = 0.0, 0
    for window in tokens:
        for token in window[:-1]:
            p = torch.log_softmax(p_logits[token].double(), -1)
            q = torch.log_softmax(q_logits[token].double(), -1)
            total += float((p.exp() * (p - q)).sum())
            count += 1
    return total / count


def _kl(dense, pruned, tokens, k, batch_size=2):
    reference = dense_reference(dense, tokens, batch_size=batch_size, k=k)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            summed, scored = reference(pruned, tokens[start:start + batch_size], start)
            total, count = total + summed, count + scored
    return total / count, reference


@pytest.mark.parametrize("k", [1, 5, 17])
def test_coarsened_kl_matches_brute_force_and_bounds_the_full_kl(k):
    g = torch.Generator().manual_seed(k)
    vocab = 40
    p_logits, q_logits = torch.randn(vocab, vocab, generator=g) * 3, torch.randn(vocab, vocab, generator=g) * 3
    tokens = torch.randint(0, vocab, (5, 9), generator=g)
    value, reference = _kl(Bigram(p_logits), Bigram(q_logits), tokens, k)
    assert value == pytest.approx(_brute_force(p_logits, q_logits, tokens, k), rel=1e-5)
    assert 0 < value < _exact_kl(p_logits, q_logits, tokens)
    assert reference.k == k and reference.top_index.dtype == torch.int32
    assert reference.nbytes == 5 * 8 * (k * 8 + 4)


@pytest.mark.parametrize("k", [40, 64])
def test_coarsened_kl_is_the_exact_kl_when_k_covers_the_vocabulary(k):
    g = torch.Generator().manual_seed(1)
    p_logits, q_logits = torch.randn(40, 40, generator=g) * 3, torch.randn(40, 40, generator=g) * 3
    tokens = torch.randint(0, 40, (3, 7), generator=g)
    value, reference = _kl(Bigram(p_logits), Bigram(q_logits), tokens, k)
    assert reference.k == 40 and torch.isneginf(reference.rest_logp).all()
    assert value == pytest.approx(_exact_kl(p_logits, q_logits, tokens), rel=1e-5)


def test_the_reference_refuses_other_windows_of_its_shape():
    """Keyed by the windows' token ids, not their shape: a second window set of the same shape (or the same
    windows in another order) is refused in one line; the same windows batched differently, or held as int32,
    are the same windows."""
    g = torch.Generator().manual_seed(3)
    p_logits, q_logits = torch.randn(40, 40, generator=g), torch.randn(40, 40, generator=g)
    first, second = torch.randint(0, 40, (4, 9), generator=g), torch.randint(0, 40, (4, 9), generator=g)
    reference = dense_reference(Bigram(p_logits), first, batch_size=2)
    with torch.inference_mode():
        for other in (second, first.flip(0), torch.cat([first[:3], second[3:]])):
            with pytest.raises(LayershapError, match="not the ones the KL's dense reference was measured on") as err:
                mean_loss(Bigram(q_logits), other, batch_size=2, loss=reference)
            assert "\n" not in str(err.value)
        with pytest.raises(LayershapError):
            reference(Bigram(q_logits), second[2:], 2)
        value = mean_loss(Bigram(q_logits), first, batch_size=2, loss=reference)
        assert mean_loss(Bigram(q_logits), first, batch_size=3, loss=reference) == pytest.approx(value, rel=1e-12)
        assert mean_loss(Bigram(q_logits), first.to(torch.int32), batch_size=2, loss=reference) == value
    assert value == pytest.approx(_brute_force(p_logits, q_logits, first, KL_TOP_K), rel=1e-5)


def test_the_rest_bucket_is_not_one_minus_the_top():
    """A dense model sure of its top tokens leaves a rest of ~1e-30: a 1-sum subtraction in float32 gives 0 there
    (and a pruned model putting real mass on it an infinite or wrong term); the logsumexp keeps it."""
    p_logits = torch.full((4, 4), -80.0)
    p_logits[:, 0] = 0.0
    q_logits = torch.zeros(4, 4)
    tokens = torch.tensor([[0, 1, 2, 3]])
    value, reference = _kl(Bigram(p_logits), Bigram(q_logits), tokens, k=1)
    assert torch.isfinite(reference.rest_logp).all() and (reference.rest_logp < -70).all()
    assert reference.rest_logp[0, 0].item() == pytest.approx(math.log(3) - 80, abs=1e-4)
    assert value == pytest.approx(math.log(4), rel=1e-6)


def test_kl_utility_picks_the_kl_loss_and_the_full_model_is_exactly_zero():
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    game = LayerGame(model, tokens, utility="kl", batch_size=2)
    assert game.loss == "kl" and game.loss_name == f"mean_kl_top{KL_TOP_K}" and game.base_nll == 0.0
    full = np.ones(6, dtype=bool)
    assert game.nll(full) == 0.0 and game.reference_passes == 1
    (_, value, _), = list(game.measure(full[None]))
    assert value == 0.0
    dropped = full.copy()
    dropped[2] = False
    kl = game.nll(dropped)
    assert kl > 0 and game(dropped) == -kl and game.reference_passes == 1  # the reference is measured once
    assert get_utility("kl").nll_of(-kl, 0.0) == kl
    assert LayerGame(model, tokens).loss == "nll"




def test_nll_context_is_unchanged_and_kl_gets_its_own(tmp_path):
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    nll = context_description(LayerGame(model, tokens))
    # what an NLL context stood for before the KL loss existed: the same names, the same loss, the same key
    assert set(nll) == {"tokens", "loss", "players", "dtype", "device", "attention", "batch_size", "torch",
                        "transformers"}
    assert nll["loss"] == "mean_nll"
    assert {utility: context_description(LayerGame(model, tokens, utility=utility))
            for utility in ("neg_nll", "ppl_ratio", "log_ratio")} == dict.fromkeys(("neg_nll", "ppl_ratio",
                                                                                    "log_ratio"), nll)
    pinned = {"tokens": "t", "loss": "mean_nll", "players": "block", "dtype": "float32", "device": "cpu",
              "attention": "sdpa", "batch_size": "8", "torch": "2", "transformers": "4"}
    assert context_key(pinned) == "66574ba67a3cad13"
    kl = context_description(LayerGame(model, tokens, utility="kl"))
    assert kl == {**nll, "loss": "mean_kl_top64"}
    assert measurement_context(LayerGame(model, tokens, utility="kl")) != measurement_context(LayerGame(model, tokens))

    masks = np.ones((4, 6), dtype=bool)
    masks[1, 0] = masks[2, 3] = masks[3, 1:4] = False
    with open_store(model, tmp_path / "s.sqlite") as store:
        nlls, evaluated, _ = evaluate_masks(LayerGame(model, TextWindows(tokens, "r", "calibration", 0)), store, masks)
        assert evaluated == 4
        measured = Measured()
        kls, evaluated, _ = evaluate_masks(LayerGame(model, TextWindows(tokens, "r", "calibration", 0), utility="kl"),
                                           store, masks, measured=measured)
        assert evaluated == 4 and measured.other_contexts == {"loss": 4}
        assert kls[0] == 0.0 and nlls[0] > 1
        again, evaluated, reused = evaluate_masks(LayerGame(model, tokens, utility="kl"), store, masks)
        assert (evaluated, reused) == (0, 4)
        np.testing.assert_array_equal(again, kls)
