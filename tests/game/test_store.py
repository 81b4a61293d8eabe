import os
import sqlite3
from pathlib import Path

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
    with EvaluationStore(path, model_fp="abc", n_layers=4) as store:
        store.put("ctx", np.ones(4, bool), 1.0, 0.1)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(LayershapError, match="another model"):
        EvaluationStore(path, model_fp="xyz", n_layers=4)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # not a byte changed, nothing added
    assert EvaluationStore(path, model_fp="abc", n_layers=4).count() == 1


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


def test_fingerprint_sees_an_edit_of_any_entry():
    """A fine-tune that touched one entry the old strided sample skipped is another model."""
    import torch

    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    weight = b.model.layers[3].mlp.up_proj.weight
    with torch.no_grad():
        weight.view(-1)[1] += 1e-3  # index 1: between the old sample's strided entries
    assert model_fingerprint(a) != model_fingerprint(b)


def _game(model, tokens, **kw):
    from layershap.game.layer_game import LayerGame

    return LayerGame(model, tokens, **kw)


def test_rows_of_another_device_or_version_are_not_reused(tmp_path, monkeypatch):
    import torch
    import transformers

    from layershap.game import context as ctx
    from layershap.game.measure import Measured, evaluate_masks

    model = tiny_model("llama")
    tokens = torch.randint(0, 320, (4, 12), generator=torch.Generator().manual_seed(0))
    masks = np.array([[1] * 6, [1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]], dtype=bool)
    store = EvaluationStore(tmp_path / "s.sqlite", model_fp=model_fingerprint(model), n_layers=6)
    cpu, evaluated, reused = evaluate_masks(_game(model, tokens), store, masks)
    assert (evaluated, reused) == (3, 0)

    real_label = ctx.device_label
    monkeypatch.setattr(ctx, "device_label", lambda device: "cuda:NVIDIA H200")
    measured = Measured()
    gpu, evaluated, reused = evaluate_masks(_game(model, tokens), store, masks, measured=measured)
    assert (evaluated, reused) == (3, 0)  # measured again, not taken from the CPU rows
    assert measured.other_contexts == {"device": 3}
    monkeypatch.setattr(ctx, "device_label", real_label)

    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    measured = Measured()
    _, evaluated, _ = evaluate_masks(_game(model, tokens), store, masks, measured=measured)
    assert evaluated == 3  # rows, by what differs: the CPU rows and the "GPU" rows
    assert measured.other_contexts == {"transformers": 3, "device, transformers": 3}
    monkeypatch.undo()

    for change in ({"batch_size": 3},):
        _, evaluated, _ = evaluate_masks(_game(model, tokens, **change), store, masks)
        assert evaluated == 3
    again, evaluated, reused = evaluate_masks(_game(model, tokens), store, masks)
    assert (evaluated, reused) == (0, 3)
    np.testing.assert_array_equal(again, cpu)
    np.testing.assert_array_equal(gpu, cpu)  # the same bits here (a CPU), just never assumed


def test_attention_implementation_and_dtype_are_part_of_the_context():
    import torch

    from layershap.game.context import context_description, measurement_context

    model = tiny_model("llama")
    tokens = torch.randint(0, 320, (2, 8))
    base = measurement_context(_game(model, tokens))
    about = context_description(_game(model, tokens))
    assert {"tokens", "dtype", "device", "attention", "batch_size", "torch", "transformers"} <= set(about)
    model.config._attn_implementation = "eager" if about["attention"] != "eager" else "sdpa"
    assert measurement_context(_game(model, tokens)) != base
    assert measurement_context(_game(tiny_model("llama").to(torch.bfloat16), tokens)) != base


def test_store_of_another_layer_count_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    EvaluationStore(path, model_fp="abc", n_layers=4).close()
    with pytest.raises(LayershapError, match="5 blocks|4 blocks"):
        EvaluationStore(path, model_fp="abc", n_layers=5)


def _legacy_store(path, model_fp, n_layers):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE TABLE evaluations (context TEXT NOT NULL, mask TEXT NOT NULL, nll REAL, "
               "seconds REAL NOT NULL, created REAL NOT NULL, PRIMARY KEY (context, mask))")
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", "1"), ("model", model_fp),
                                                      ("n_layers", str(n_layers))])
    db.execute("INSERT INTO evaluations VALUES ('oldctx', '111111', 1.5, 0.1, 0.0)")
    db.commit()
    db.close()


def test_a_store_of_the_old_schema_stays_readable_and_its_rows_are_not_reused(tmp_path):
    import torch

    from layershap.game.context import legacy_model_fingerprint
    from layershap.game.measure import Measured, evaluate_masks
    from layershap.game.store import open_store

    model = tiny_model("llama")
    path = tmp_path / "old.sqlite"
    _legacy_store(path, legacy_model_fingerprint(model), 6)
    with open_store(model, path) as store:
        assert store.count() == 1 and store.all_nlls("oldctx") == {"111111": 1.5}
        measured = Measured()
        tokens = torch.randint(0, 320, (2, 8))
        nlls, evaluated, _ = evaluate_masks(_game(model, tokens), store, np.ones((1, 6), bool), measured=measured)
        assert evaluated == 1 and nlls[0] != 1.5
        assert measured.other_contexts == {"layershap version": 1}
    other = tmp_path / "other.sqlite"
    _legacy_store(other, "0123456789abcdef", 6)
    before = other.read_bytes()
    with pytest.raises(LayershapError, match="another model"):
        open_store(model, other)
    assert other.read_bytes() == before


def test_a_read_only_store_is_one_line():
    """A store file and folder the user may not write (chmod; as root, checked as a throwaway uid, so it runs
    in CI): one line naming the store, nothing else."""
    from unprivileged import as_unprivileged, reachable_tmpdir

    with reachable_tmpdir() as folder:
        path = folder / "s.sqlite"
        EvaluationStore(path, model_fp="abc", n_layers=3).close()
        path.chmod(0o444)
        folder.chmod(0o555)

        def check() -> str:
            assert not os.access(path, os.W_OK)
            try:
                EvaluationStore(path, model_fp="abc", n_layers=3).put("ctx", np.ones(3, bool), 1.0, 0.1)
            except LayershapError as exc:
                return f"LayershapError: {exc}"
            return "no error"

        result = as_unprivileged(check)
    assert result.startswith("LayershapError: cannot write the evaluation store "), result
    assert "\n" not in result and "make it writable or give another --store" in result


def test_a_store_sqlite_opens_read_only_is_one_line(tmp_path, monkeypatch):
    """The same refusal when SQLite itself opens the file read-only (URI mode=ro: a read-only mount, or a
    file the process may read but not write), whoever runs the test."""
    from layershap.game import store as store_module

    path = tmp_path / "s.sqlite"
    EvaluationStore(path, model_fp="abc", n_layers=3).close()
    connect = store_module.sqlite3.connect
    monkeypatch.setattr(store_module.sqlite3, "connect",
                        lambda target, **kwargs: connect(f"{Path(target).as_uri()}?mode=ro", uri=True, **kwargs))
    before = path.read_bytes()
    with pytest.raises(LayershapError, match="cannot write the evaluation store .*readonly") as err:
        EvaluationStore(path, model_fp="abc", n_layers=3).put("ctx", np.ones(3, bool), 1.0, 0.1)
    assert "\n" not in str(err.value)
    assert path.read_bytes() == before


def test_a_locked_store_is_one_line(tmp_path):
    from layershap.game import store as store_module

    path = tmp_path / "s.sqlite"
    EvaluationStore(path, model_fp="abc", n_layers=3).close()

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        store_module.LOCK_TIMEOUT_SECONDS = 0.2
        with pytest.raises(LayershapError, match="locked by another process"):
            EvaluationStore(path, model_fp="abc", n_layers=3).put("ctx", np.ones(3, bool), 1.0, 0.1)
    finally:
        store_module.LOCK_TIMEOUT_SECONDS = 30.0
        holder.execute("ROLLBACK")


def test_leases_share_masks_and_lapse_when_the_holder_stops(tmp_path):
    path = tmp_path / "s.sqlite"
    first = EvaluationStore(path, model_fp="abc", n_layers=3)
    second = EvaluationStore(path, model_fp="abc", n_layers=3)
    masks = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=bool)
    assert first.claim("ctx", masks, ttl=60, limit=2) == ["111", "101"]
    assert second.claim("ctx", masks, ttl=60) == ["011", "110"]  # not the first's
    assert second.leased_by_others("ctx", masks) == 2
    first.put("ctx", masks[0], 1.0, 0.1)
    assert first.claim("ctx", masks, ttl=60) == ["101"]  # its own lease again; the stored mask is not offered
    first.claim("ctx", masks[1:2], ttl=-1)  # as if its holder died long ago
    assert second.claim("ctx", masks, ttl=60) == ["101", "011", "110"]
    second.release("ctx")
    assert first.leased_by_others("ctx", masks) == 0
