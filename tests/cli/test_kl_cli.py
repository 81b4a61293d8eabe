"""`--utility kl` end to end on a tiny Llama: estimate and prune run, the record names the loss, and no KL is
printed or stored as a perplexity."""

from __future__ import annotations

import json
import math
import re
import sqlite3

from conftest import run_cli

WINDOWS = ["--samples", 4, "--seq-len", 16]


def test_estimate_with_the_kl_utility(capsys, tiny_model_dir, long_text_file, tmp_path):
    out = tmp_path / "est"
    args = ["estimate", "--model", tiny_model_dir, "--data", long_text_file, *WINDOWS, "--budget", 24, "--utility",
            "kl", "--store", tmp_path / "s.sqlite", "--out", out]
    code, stdout, err = run_cli([*args, "--dry-run"], capsys)
    assert code == 0, err
    passes = int(re.search(r"would run (\d+) forward passes \(0 of (\d+) masks", stdout)[1])
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    record = json.loads((out / "shapley.json").read_text())
    assert record["loss"] == "mean_kl_top64" and record["base_nll"] == 0.0
    assert record["settings"]["utility"] == "kl" and passes == record["evaluations"] + 1  # and the reference
    assert all(math.isfinite(e["shapley"]) for e in record["layers"])


def test_prune_with_the_kl_utility_reports_calibration_perplexity_from_the_nll(capsys, tiny_model_dir,
                                                                               long_text_file, tmp_path):
    out, store = tmp_path / "pruned", tmp_path / "s.sqlite"
    code, _, err = run_cli(["prune", "--ratio", "0.34", "--out", out, "--model", tiny_model_dir, "--data",
                             long_text_file, "--eval-data", long_text_file, *WINDOWS, "--eval-samples", 2,
                             "--eval-seq-len", 16, "--budget", 40, "--confirm", 2, "--utility", "kl",
                             "--store", store], capsys)
    assert code == 0, err
    record = json.loads((out / "layershap.json").read_text())
    plan = record["plan"]
    assert plan["loss"] == "mean_kl_top64" and "predicted_calibration_ppl" not in plan
    assert plan["measured_calibration_kl"] > 0 and math.isfinite(plan["predicted_calibration_kl"])
    rounds = plan["confirmation"]["rounds"]
    assert rounds and all(r["loss"] == "mean_kl_top64" for r in rounds)
    cost = record["cost"]
    assert cost["passes"] == record["forward_passes"] and cost["paid_passes"] == cost["passes"]
    assert 0 < cost["token_passes"] <= 40 * 4 * 16 * 7  # the reference passes are inside the budget
    # the dense model's and the plan's NLL went to the store under the NLL's context, apart from the KL rows
    contexts = dict(sqlite3.connect(store).execute("SELECT context, COUNT(*) FROM evaluations GROUP BY context"))
    about = {key: json.loads(value)["loss"] for key, value in
             sqlite3.connect(store).execute("SELECT context, description FROM contexts")}
    nll = [c for c in contexts if about.get(c) == "mean_nll"]
    assert len(nll) == 1 and contexts[nll[0]] == 2
    rows = dict(sqlite3.connect(store).execute("SELECT mask, nll FROM evaluations WHERE context = ?", nll))
    kept = "".join("1" if i in record["kept"] else "0" for i in range(record["n_layers"]))
    assert math.exp(rows["1" * record["n_layers"]]) == plan["dense_calibration_ppl"]
    assert math.exp(rows[kept]) == plan["measured_calibration_ppl"]


def test_sublayer_prune_refuses_the_kl_utility(capsys, tiny_model_dir, long_text_file, tmp_path):
    code, _, err = run_cli(["prune", "--granularity", "sublayer", "--ratio", "0.25", "--utility", "kl", *WINDOWS,
                            "--model", tiny_model_dir, "--data", long_text_file, "--out", tmp_path / "x"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--utility kl with --granularity sublayer" in lines[0], err


def test_sublayer_compare_refuses_the_kl_utility(capsys, tiny_model_dir, long_text_file, tmp_path):
    code, _, err = run_cli(["compare", "--ratios", "0.3", "--methods", "shapley", "--granularity", "sublayer",
                            "--utility", "kl", "--model", tiny_model_dir, "--data", long_text_file, "--eval-data",
                            long_text_file, *WINDOWS, "--out", tmp_path / "c"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--utility kl with --granularity sublayer" in lines[0], err
