"""compare --granularity sublayer: sublayer methods at a parameter ratio, block methods at the fewest blocks
that reach it, exact held-out perplexities, the record's fields, and bad input as one line."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
from conftest import run_cli
from test_compare import CLI_WINDOWS, WINDOWS, _one_line_error
from tiny_models import tiny_model

from layershap.data.windows import text_windows
from layershap.estimate.pipeline import EstimateSettings
from layershap.evaluate.compare import compare_methods
from layershap.game.nll import perplexity
from layershap.models.sublayers import parse_sublayer, remove_sublayers


def test_compare_sublayer_api(tiny_tokenizer, long_text_file, tmp_path):
    model = tiny_model("llama")
    text = str(long_text_file)
    record = compare_methods(model, tiny_tokenizer, methods=["llmdrop", "last", "shapley"], ratios=[0.3],
                             data=text, eval_data=[text], seed=1, batch_size=4, granularity="sublayer",
                             settings=EstimateSettings(budget=40), store=tmp_path / "s.sqlite", out=tmp_path,
                             **WINDOWS)
    assert record["granularity"] == "sublayer"
    rows = {row["method"]: row for row in record["rows"]}
    assert list(rows) == ["dense", "llmdrop", "last", "shapley", "shapley-block"]
    held_out = text_windows(text, tiny_tokenizer, samples=2, seq_len=16, seed=1, split="evaluation")
    for name in ("llmdrop", "shapley"):
        row = rows[name]
        assert row["granularity"] == "sublayer" and row["parameter_fraction_removed"] >= 0.3
        mask = np.ones(12, dtype=bool)
        mask[[parse_sublayer(s, 6) for s in row["removed"]]] = False
        pruned = remove_sublayers(copy.deepcopy(model), mask)  # the measured ppl is that of the removed model
        assert row["ppl"][text] == perplexity(pruned, held_out.tokens, batch_size=4)
        assert row["kv_cache_fraction_removed"] == (~mask[0::2]).sum() / 6
    assert rows["llmdrop"]["forward_passes"] == 1
    # a block method removes the fewest blocks whose parameters reach the ratio: ceil(0.3 * 6) = 2
    assert rows["last"]["granularity"] == "block" and rows["last"]["removed"] == [3, 4]
    assert math.isclose(rows["last"]["parameter_fraction_removed"], 2 / 6)
    assert rows["shapley-block"]["granularity"] == "block" and len(rows["shapley-block"]["removed"]) == 2
    assert rows["shapley"]["forward_passes"] > rows["shapley-block"]["forward_passes"] > 0
    for name in ("llmdrop", "last", "shapley", "shapley-block"):  # every row says what choosing it cost
        assert rows[name]["cost"]["passes"] == rows[name]["forward_passes"]
    assert rows["shapley"]["cost"]["token_passes"] > rows["shapley-block"]["cost"]["token_passes"]
    assert "KV cache removed" in (tmp_path / "compare.md").read_text()
    assert "kv_cache_fraction_removed" in (tmp_path / "compare.csv").read_text().splitlines()[0]
    assert json.loads((tmp_path / "compare.json").read_text())["granularity"] == "sublayer"


def test_compare_sublayer_cli_and_errors(capsys, tiny_model_dir, long_text_file, tmp_path):
    common = ["--ratios", "0.3", "--model", tiny_model_dir, "--data", long_text_file, "--eval-data",
              long_text_file, *CLI_WINDOWS]
    code, stdout, err = run_cli(["compare", *common, "--methods", "llmdrop", "--granularity", "sublayer",
                                 "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    assert "KV cache removed" in stdout and "attn." in stdout
    code, _, err = run_cli(["compare", *common, "--methods", "llmdrop", "--out", tmp_path / "b"], capsys)
    _one_line_error(code, err, "unknown method 'llmdrop'")
    code, _, err = run_cli(["compare", *common, "--methods", "last", "--granularity", "layer",
                            "--out", tmp_path / "c"], capsys)
    _one_line_error(code, err, "--granularity must be one of")
