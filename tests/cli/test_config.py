"""Configuration files: the TOML writer, reading and checking --config, command-line precedence, and every run
directory's config.toml reproducing the run."""

import json
import math
import tomllib
from pathlib import Path

import pytest
from conftest import run_cli

from layershap.config import dumps_toml, load_config
from layershap.errors import LayershapError


def _one_line_error(code, err, pattern):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


def test_toml_writer_round_trips_every_flat_value():
    values = {"name": 'a "quoted" \\ back\nslash\ttab \x01 ünïcode', "count": 3, "ratio": 0.1, "tiny": 1e-300,
              "big": 12345678901234567890.0, "flag": False, "on": True, "path": Path("/tmp/x y"),
              "names": ["wiki", "c4"], "layers": [0, -1], "empty": [], "none": None, "dashed-key": 1}
    text = dumps_toml(values, {"layershap": {"command": "estimate", "inf": math.inf, "ninf": -math.inf}})
    loaded = tomllib.loads(text)
    expected = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if v is not None}
    assert {k: v for k, v in loaded.items() if k != "layershap"} == expected
    assert loaded["layershap"] == {"command": "estimate", "inf": math.inf, "ninf": -math.inf}
    assert math.isnan(tomllib.loads(dumps_toml({"x": math.nan}))["x"])
    with pytest.raises(TypeError):
        dumps_toml({"x": {"nested": 1}})


def test_load_config_checks_and_converts(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('budget = 30\nseq-len = 64\neval_data = ["wiki", "c4"]\nprotect = [0, -1]\n'
                    '[layershap]\ncommand = "prune"\nmodel_fingerprint = "abc"\n')
    params = ["budget", "seq_len", "eval_data", "protect", "config"]
    assert load_config(path, command="prune", parameters=params) == {
        "budget": 30, "seq_len": 64, "eval_data": "wiki,c4", "protect": "0,-1"}
    with pytest.raises(LayershapError, match="configuration of `layershap prune`"):
        load_config(path, command="estimate", parameters=params)
    path.write_text("budget = 30\nbogus = 1\nalso-bogus = 2\nconfig = 'x'\n")
    with pytest.raises(LayershapError, match=r"unknown keys for `layershap estimate`: also-bogus, bogus, config$"):
        load_config(path, command="estimate", parameters=params)
    path.write_text("budget = [\n")
    with pytest.raises(LayershapError, match="not valid TOML"):
        load_config(path, command="estimate", parameters=params)
    with pytest.raises(LayershapError, match="does not exist"):
        load_config(tmp_path / "missing.toml", command="estimate", parameters=params)


def _estimate(model_dir, text, tmp_path, *extra):
    return ["estimate", "--model", model_dir, "--data", text, "--samples", "4", "--seq-len", "32",
            "--store", tmp_path / "s.sqlite", *extra]


def test_config_file_command_line_precedence_and_reproduction(capsys, tiny_model_dir, long_text_file, tmp_path):
    config = tmp_path / "in.toml"
    config.write_text(f'budget = 25\nout = "{tmp_path / "from-config"}"\nsampler = "shapley"\n')
    code, _, err = run_cli(_estimate(tiny_model_dir, long_text_file, tmp_path, "--config", config,
                                     "--budget", "20"), capsys)
    assert code == 0, err
    run = tmp_path / "from-config"  # --out came from the file, --budget from the command line
    record = json.loads((run / "shapley.json").read_text())
    assert record["settings"]["budget"] == 20 and record["settings"]["sampler"] == "shapley"
    assert set(record["versions"]) >= {"layershap", "torch", "transformers"}

    written = tomllib.loads((run / "config.toml").read_text())
    assert written["budget"] == 20 and written["sampler"] == "shapley" and written["surrogate"] == "pairwise"
    assert written["seq_len"] == 32 and written["dtype"] == "float32" and "config" not in written
    meta = written["layershap"]
    assert meta["command"] == "estimate" and meta["model_fingerprint"] == record["model_fingerprint"]
    assert meta["calibration_fingerprint"] == record["calibration"]["fingerprint"]
    assert set(meta) >= {"layershap", "torch", "transformers", "command_line", "reproduce"}
    assert "--budget 20" in meta["command_line"]

    code, _out, err = run_cli(["estimate", "--config", run / "config.toml"], capsys)
    assert code == 0, err
    again = json.loads((run / "shapley.json").read_text())
    assert (again["evaluations"], again["reused"]) == (0, record["masks"])
    assert again["layers"] == record["layers"]

    code, _, err = run_cli(["prune", "--config", run / "config.toml", "--ratio", "0.3"], capsys)
    _one_line_error(code, err, "configuration of `layershap estimate`")
    bad = tmp_path / "bad.toml"
    bad.write_text("budget = 20\nfrobnicate = 1\nwindow = 3\n")
    code, _, err = run_cli(["estimate", "--config", bad, "--out", tmp_path / "x"], capsys)
    _one_line_error(code, err, "unknown keys for `layershap estimate`: frobnicate, window")


def test_prune_writes_config_and_versions(capsys, tiny_model_dir, long_text_file, tmp_path):
    out = tmp_path / "pruned"
    code, _, err = run_cli(["prune", "--ratio", "0.34", "--method", "shortgpt", "--out", out, "--model",
                            tiny_model_dir, "--data", long_text_file, "--eval-data", long_text_file, "--samples", "4",
                            "--seq-len", "32", "--eval-samples", "2", "--eval-seq-len", "32"], capsys)
    assert code == 0, err
    record = json.loads((out / "layershap.json").read_text())
    written = tomllib.loads((out / "config.toml").read_text())
    assert written["ratio"] == 0.34 and written["method"] == "shortgpt" and written["eval_data"] == [str(long_text_file)]
    meta = written["layershap"]
    assert meta["command"] == "prune" and meta["model_fingerprint"] == record["model_fingerprint"]
    assert meta["evaluation_fingerprints"] == [f"{long_text_file}:{record['evaluation'][str(long_text_file)]['fingerprint']}"]
    assert record["versions"]["torch"] == meta["torch"]
    params = {k for k in written if k != "layershap"}
    assert load_config(out / "config.toml", command="prune", parameters=params | {"config"})
