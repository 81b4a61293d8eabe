import sqlite3

import numpy as np
import pytest
from tiny_models import tiny_model

from layershap.errors import LayershapError
from layershap.game.context import model_fingerprint
from layershap.game.store import EvaluationStore, mask_key


def test_put_get_roundtrip_and_divergence(tmp_path):
    store = EvaluationStore(tmp_path / "s.sqlite", model_fp="abc", n_layers=4)
    masks = np.array([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=bool)
    store.put("ctx", masks[0], 2.5, 0.1)
    store.put("ctx", masks[1], float("inf"), 0.1)
    got = store.get_many("ctx", masks)
    assert got[mask_key(masks[0])] == 2.5
    assert np.isnan(got[mask_key(masks[1])])  # diverged masks stay in the data
    assert mask_key(masks[2]) not in got
    assert store.get_many("other", masks) == {}
    store.close()
    reopened = EvaluationStore(tmp_path / "s.sqlite", model_fp="abc", n_layers=4)
    assert reopened.count("ctx") == 2
    everything = reopened.all_nlls("ctx")
    assert set(everything) == {mask_key(masks[0]), mask_key(masks[1])} and everything[mask_key(masks[0])] == 2.5
    assert np.isnan(everything[mask_key(masks[1])]) and reopened.all_nlls("other") == {}


def test_store_of_another_model_is_refused_and_untouched(tmp_path):
    path = tmp_path / "s.sqlite"
    EvaluationStore(path, model_fp="abc", n_layers=4).put("ctx", np.ones(4, bool), 1.0, 0.1)
    before = path.read_bytes()
    with pytest.raises(LayershapError, match="another model"):
        EvaluationStore(path, model_fp="xyz", n_layers=4)
    assert EvaluationStore(path, model_fp="abc", n_layers=4).count() == 1
    assert len(before) > 0


def test_corrupt_store_is_refused_without_damage(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    before = path.read_bytes()
    with pytest.raises(LayershapError, match="not a layershap evaluation store"):
        EvaluationStore(path, model_fp="abc", n_layers=4)
    assert path.read_bytes() == before


def test_rows_are_committed_immediately(tmp_path):
    path = tmp_path / "s.sqlite"
    store = EvaluationStore(path, model_fp="abc", n_layers=3)
    store.put("ctx", np.array([1, 0, 1], bool), 3.0, 0.2)
    # another connection sees the row without any close or commit call
    rows = sqlite3.connect(path).execute("SELECT mask, nll FROM evaluations").fetchall()
    assert rows == [("101", 3.0)]


def test_fingerprint_tracks_weights_and_layers():
    from layershap.models.layers import prune_layers

    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_model("llama", seed=1))
    prune_layers(b, [2])
    assert model_fingerprint(a) != model_fingerprint(b)
