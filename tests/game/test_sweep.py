"""The block-by-block sweep of a batch of masks (game/sweep.py) equals the plain path bit for bit, loads each
block once per chunk of masks, and is what the game runs on a streamed model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from layershap.game.layer_game import LayerGame
from layershap.game.prefix import plain_nlls
from layershap.game.sweep import SWEEP_TYPES, BlockSweep
from layershap.models.stream import load_streamed, streamer_of


def _saved(tmp_path, kind):
    tiny_model(kind).save_pretrained(tmp_path / kind)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.float32).eval()
    return loaded, load_streamed(tmp_path / kind, dtype=torch.float32, device=torch.device("cpu"))


def _masks():
    masks = np.random.default_rng(0).random((10, 6)) > 0.4
    masks[0], masks[1] = True, False
    return masks


@pytest.mark.parametrize("kind", SWEEP_TYPES)
def test_sweep_equals_the_plain_path_bit_for_bit(tmp_path, kind):
    loaded, streamed = _saved(tmp_path, kind)
    tokens = torch.randint(0, 320, (5, 16), generator=torch.Generator().manual_seed(0))
    masks = _masks()
    want = plain_nlls(loaded, tokens, masks, batch_size=2)
    sweep = BlockSweep(streamed, tokens, batch_size=2, max_state_bytes=4 * tokens.numel() * 32 * 4)
    got = {row: value for row, value, _ in sweep.measure(masks)}
    assert sweep.chunk == 4 and np.array_equal(np.array([got[i] for i in range(len(masks))]), want)
    # every block at most once per chunk of masks: 3 chunks x 6 blocks
    assert streamer_of(streamed).loads <= 3 * 6


def test_sweep_on_an_in_memory_model_equals_it_too(tiny_llama):
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(1))
    masks = _masks()
    got = np.array([value for _, value, _ in sorted(BlockSweep(tiny_llama, tokens, batch_size=3).measure(masks))])
    assert np.array_equal(got, plain_nlls(tiny_llama, tokens, masks, batch_size=3))


@pytest.mark.parametrize("utility", ["neg_nll", "kl"])
def test_the_game_sweeps_a_streamed_model_and_measures_what_the_loaded_one_does(tmp_path, utility):
    loaded, streamed = _saved(tmp_path, "llama")
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(2))
    masks = _masks()
    plain = LayerGame(loaded, tokens, utility=utility, batch_size=2)
    game = LayerGame(streamed, tokens, utility=utility, batch_size=2)
    want = {row: value for row, value, _ in plain.measure(masks)}
    got = {row: value for row, value, _ in game.measure(masks)}
    assert got == want and game._sweep is not None and game._prefix is None
