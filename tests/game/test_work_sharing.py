"""Runs that share a store share the work, across real processes: a run killed with SIGKILL loses only the
masks it had in flight, and another run takes them over once their lease lapses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.game import measure
from layershap.game.context import context_description, context_key
from layershap.game.layer_game import LayerGame
from layershap.game.store import mask_key, open_store

TESTS = Path(__file__).resolve().parents[1]

# The doomed run: build the same tiny model and windows, lease six masks, commit two, then wait to be killed.
HOLDER = textwrap.dedent("""
    import sys, time
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from tiny_models import VOCAB, tiny_model
    from layershap.game.context import context_description, context_key
    from layershap.game.layer_game import LayerGame
    from layershap.game.store import open_store
    torch.set_num_threads(1)
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    game = LayerGame(model, tokens)
    masks = np.load({masks!r})
    store = open_store(model, {store!r})
    context = context_key(context_description(game))
    store.describe(context, context_description(game))
    claimed = store.claim(context, masks, ttl={ttl}, limit=6)
    for mask in masks[:2]:
        store.put(context, mask, game.nll(mask), 0.0)
    print("holding", len(claimed), flush=True)
    time.sleep(600)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_run_loses_only_its_masks_in_flight(tmp_path, monkeypatch):
    masks = np.ones((10, 6), dtype=bool)
    for row in range(1, 10):
        masks[row, (row - 1) % 6] = False
        masks[row, (row + 2) % 6] = row < 6
    masks = np.unique(masks, axis=0)[::-1].copy()
    np.save(tmp_path / "masks.npy", masks)
    store_path = tmp_path / "store.sqlite"
    ttl = 4.0
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    game = LayerGame(model, tokens)
    context = context_key(context_description(game))
    monkeypatch.setattr(measure, "POLL_SECONDS", 0.05)
    with open_store(model, store_path) as store:
        script = HOLDER.format(tests=str(TESTS), masks=str(tmp_path / "masks.npy"), store=str(store_path), ttl=ttl)
        holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        try:
            line = holder.stdout.readline()
            assert line.startswith("holding 6"), line
            os.kill(holder.pid, signal.SIGKILL)
            killed_at = time.monotonic()
        finally:
            holder.kill()
            holder.wait()
        assert store.leased_by_others(context, masks) == 6  # the killed run's leases outlive it
        detail = measure.Measured()
        nlls, evaluated, reused = measure.evaluate_masks(game, store, masks, measured=detail)
        waited = time.monotonic() - killed_at
        assert store.leased_by_others(context, masks) == 0
        stored = store.get_many(context, masks)
    # the two committed masks are read back, every other one measured once, after the dead leases lapsed
    assert (evaluated, reused) == (len(masks) - 2, 2)
    assert waited >= ttl - 1.0  # the dead run's masks were taken only once their leases lapsed
    plain = LayerGame(tiny_model("llama"), tokens)
    expected = np.array([plain.nll(mask) for mask in masks])
    assert np.array_equal(nlls, expected)
    assert sorted(stored) == sorted(mask_key(m) for m in masks)
