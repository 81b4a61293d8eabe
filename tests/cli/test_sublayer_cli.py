"""`prune --granularity sublayer` on a tiny Llama: the plan, the record, a directory that loads with remote
code to the recorded perplexity; recurrent models refuse in one line with exit code 2."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers
from conftest import run_cli
from tiny_models import tiny_model

WINDOWS = ["--samples", 2, "--seq-len", 16]


def _common(model_dir, text):
    return ["--model", model_dir, "--data", text, "--eval-data", text, "--eval-samples", 2, "--eval-seq-len", 16]


def test_prune_sublayers(capsys, tiny_model_dir, long_text_file, tmp_path):
    out = tmp_path / "sub"
    code, stdout, err = run_cli(["prune", "--granularity", "sublayer", "--ratio", "0.25", "--budget", 40, *WINDOWS,
                                 *_common(tiny_model_dir, long_text_file), "--out", out], capsys)
    assert code == 0, err
    assert "sublayers" in stdout
    record = json.loads((out / "layershap.json").read_text())
    assert record["granularity"] == "sublayer"
    assert record["parameter_fraction_removed"] >= 0.25
    assert all(name.split(".")[0] in ("attn", "mlp") for name in record["removed_sublayers"])
    plan = record["plan"]
    # the block plan of the same ratio is measured, and the chosen plan is never worse on calibration
    assert plan["measured_calibration_ppl"] <= plan["block_plan"]["measured_calibration_ppl"]
    assert 0 <= record["kv_cache_fraction_removed"] <= 1
    cost = record["cost"]  # a cold store: everything used was paid; the block plan's passes are in it
    assert record["forward_passes"] == cost["passes"] == cost["paid_passes"] > plan["block_plan"]["forward_passes"]
    assert cost["token_passes"] == cost["paid_token_passes"] > plan["block_plan"]["cost"]["token_passes"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        generated = reloaded.generate(torch.arange(1, 6)[None], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)
    code, stdout, err = run_cli(["ppl", "--model", out, "--trust-remote-code", "--data", long_text_file,
                                 "--samples", 2, "--seq-len", 16, "--json"], capsys)
    assert code == 0, err
    ppl = json.loads(stdout)["ppl"][str(long_text_file)]
    assert ppl == pytest.approx(record["ppl_after"][str(long_text_file)], rel=1e-5)


def test_prune_sublayers_then_quantize(capsys, tiny_model_dir, long_text_file, tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "subq"
    code, stdout, err = run_cli(["prune", "--granularity", "sublayer", "--ratio", "0.25", "--budget", 40,
                                 "--quantize", "int8", *WINDOWS, *_common(tiny_model_dir, long_text_file),
                                 "--out", out], capsys)
    assert code == 0, err
    assert "after int8" in stdout
    record = json.loads((out / "layershap.json").read_text())
    assert record["granularity"] == "sublayer" and record["quantization"]["scheme"] == "int8"
    assert (out / "modeling_layershap.py").is_file() and "auto_map" in json.loads((out / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(reloaded).__module__.endswith("modeling_layershap")
    assert type(reloaded.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"  # quantized
    code, stdout, err = run_cli(["ppl", "--model", out, "--data", long_text_file, "--samples", 2, "--seq-len", 16,
                                 "--json"], capsys)
    assert code == 0, err
    ppl = json.loads(stdout)["ppl"][str(long_text_file)]
    assert ppl == pytest.approx(record["quantization"]["ppl"][str(long_text_file)], rel=1e-5)


def test_recurrent_model_refuses_sublayers(capsys, tiny_tokenizer, long_text_file, tmp_path):
    path = tmp_path / "mamba"
    tiny_model("mamba").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    code, _, err = run_cli(["prune", "--granularity", "sublayer", "--ratio", "0.34", *WINDOWS,
                            *_common(path, long_text_file), "--out", tmp_path / "x"], capsys)
    assert code == 2
    assert "recurrent" in err and len(err.strip().splitlines()) == 1


def test_unknown_granularity_is_refused(capsys, tmp_path):
    code, _, err = run_cli(["prune", "--granularity", "head", "--ratio", "0.3", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--granularity" in err
    assert np is not None


def test_estimate_sublayers(capsys, tiny_model_dir, long_text_file, tmp_path):
    out = tmp_path / "est"
    args = ["estimate", "--granularity", "sublayer", "--budget", 30, *WINDOWS, "--model", tiny_model_dir,
            "--data", long_text_file, "--store", tmp_path / "s.sqlite", "--out", out]
    code, stdout, err = run_cli([*args, "--dry-run"], capsys)
    assert code == 0, err
    # --budget is full-size passes: a sublayer mask is charged its kept share, so 30 buy more than 30 masks
    planned = re.search(r"would run (\d+) forward passes \(0 of \1 masks already stored; all \1 = ([\d.]+) "
                        r"full-size passes\)", stdout)
    assert planned, stdout
    masks = int(planned[1])
    assert masks > 30 and 29 < float(planned[2]) <= 30
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "lowest-valued sublayers: " in stdout
    record = json.loads((out / "shapley.json").read_text())
    assert record["granularity"] == "sublayer" and record["n_layers"] == 12
    assert [e["name"] for e in record["layers"]][:3] == ["attn.0", "mlp.0", "attn.1"]
    assert (out / "shapley.csv").read_text().splitlines()[1].startswith("0,attn.0,")
    assert "granularity" in (out / "config.toml").read_text()
    code, stdout, err = run_cli([*args, "--dry-run"], capsys)
    assert code == 0 and f"would run 0 forward passes ({masks} of {masks} masks already stored" in stdout, err


def test_confirm_with_sublayers_is_refused_in_one_line(capsys, tiny_model_dir, long_text_file, tmp_path):
    """--confirm used to be accepted and silently dropped (the record then said no windows were free)."""
    code, _, err = run_cli(["prune", "--granularity", "sublayer", "--ratio", "0.25", "--confirm", 2, *WINDOWS,
                            *_common(tiny_model_dir, long_text_file), "--out", tmp_path / "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--confirm" in err and "--granularity block" in err, err
    assert not (tmp_path / "x" / "layershap.json").exists()
