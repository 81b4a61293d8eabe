"""The embedded default model (SmolLM2-135M, 30 blocks) end to end, with small settings."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

import layershap
from layershap.game.nll import perplexity
from layershap.models.layers import keep_only

pytestmark = pytest.mark.real_model


def test_default_model_loads_and_skipping_equals_removal(default_model):
    model, tokenizer = default_model
    assert model.config.model_type == "llama" and layershap.num_layers(model) == 30
    windows = layershap.text_windows("c4", tokenizer, samples=2, seq_len=64)
    mask = np.ones(30, dtype=bool)
    mask[[3, 12, 17]] = False
    with keep_only(model, mask):
        skipped = model(input_ids=windows.tokens).logits
    full = perplexity(model, windows.tokens)
    assert 5 < full < 200  # a real pretrained model, not random weights (random would be ~49152)
    import copy

    pruned = layershap.prune_layers(copy.deepcopy(model), [3, 12, 17])
    torch.testing.assert_close(pruned(input_ids=windows.tokens).logits, skipped, rtol=0, atol=0)


def test_estimate_and_prune_shapley_on_the_default_model(capsys, tmp_path):
    store = tmp_path / "store.sqlite"
    small = ["--samples", "2", "--seq-len", "64", "--budget", "24", "--store", store]
    code, out, err = run_cli(["estimate", "--out", tmp_path / "run", *small], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "shapley.json").read_text())
    assert record["n_layers"] == 30 and len(record["layers"]) == 30
    masks = record["masks"]  # --budget 24 full-size passes buys more masks than 24: they skip blocks
    assert masks > 24 and record["evaluations"] == masks and record["reused"] == 0
    assert {"r2", "spearman", "mae", "n_train", "n_holdout"} <= set(record["surrogate"])
    code, out, err = run_cli(["estimate", "--out", tmp_path / "run", *small], capsys)
    assert code == 0 and f"0 masks evaluated, {masks} reused" in out

    code, out, err = run_cli(["prune", "--ratio", "0.2", "--protect", "0,-1", "--out", tmp_path / "pruned",
                              "--eval-samples", "2", "--eval-seq-len", "64", *small], capsys)
    assert code == 0, err
    pruned = json.loads((tmp_path / "pruned" / "layershap.json").read_text())
    assert pruned["method"] == "shapley" and len(pruned["removed"]) == 6
    assert 0 not in pruned["removed"] and 29 not in pruned["removed"]
    assert pruned["ppl_after"]["wiki"] > pruned["ppl_before"]["wiki"] > 1
    assert np.isfinite(pruned["plan"]["measured_calibration_ppl"])

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert reloaded.config.num_hidden_layers == 24


def test_compare_on_the_default_model(capsys, tmp_path):
    out = tmp_path / "cmp"
    code, _stdout, err = run_cli(["compare", "--ratios", "0.2", "--methods", "shortgpt,last", "--out", out,
                                 "--samples", "2", "--seq-len", "64", "--eval-data", "wiki,code",
                                 "--eval-samples", "2", "--eval-seq-len", "64"], capsys)
    assert code == 0, err
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert (rows[0]["method"], rows[0]["ratio"], rows[0]["removed"]) == ("dense", 0, [])
    by_method = {row["method"]: row for row in rows if row["ratio"] > 0}
    assert set(by_method) == {"shortgpt", "last"}
    assert by_method["last"]["removed"] == list(range(23, 29))
    for row in by_method.values():
        assert set(row["ppl"]) == {"wiki", "code"} and len(row["removed"]) == 6
        assert row["ppl"]["wiki"] > rows[0]["ppl"]["wiki"]
    assert (out / "compare.md").is_file() and (out / "compare.png").is_file()
