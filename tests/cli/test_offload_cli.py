"""`--offload`: prune with streamed blocks chooses, measures and saves what the loaded model does; a model that
does not fit is refused in one line with exit code 2."""

from __future__ import annotations

import json

from conftest import run_cli
from transformers import AutoModelForCausalLM


def _prune(capsys, tmp_path, tiny_model_dir, long_text_file, offload, method):
    out = tmp_path / f"{method}-{offload}"
    code, _, err = run_cli(["prune", "--model", tiny_model_dir, "--ratio", "0.34", "--method", method,
                                 "--offload", offload, "--out", out, "--budget", "30", "--samples", "3",
                                 "--seq-len", "16", "--eval-samples", "2", "--eval-seq-len", "16",
                                 "--data", long_text_file, "--eval-data", long_text_file,
                                 "--store", tmp_path / f"{offload}.sqlite", "--repair", "none"], capsys)
    assert code == 0, err  # --repair none: a streamed model is never repaired (auto means none for it)
    return out, json.loads((out / "layershap.json").read_text()), err


def test_streamed_prune_equals_the_loaded_one(capsys, tmp_path, tiny_model_dir, long_text_file):
    for method in ("shapley", "shortgpt"):
        streamed_out, streamed, err = _prune(capsys, tmp_path, tiny_model_dir, long_text_file, "disk", method)
        _, loaded, _ = _prune(capsys, tmp_path, tiny_model_dir, long_text_file, "none", method)
        assert "streaming blocks" in err
        for key in ("removed", "scores", "ppl_before", "ppl_after", "model_fingerprint"):
            assert streamed[key] == loaded[key], key
        reloaded = AutoModelForCausalLM.from_pretrained(streamed_out)
        assert reloaded.config.num_hidden_layers == 6 - len(streamed["removed"])


def test_a_streamed_model_is_not_repaired_and_says_so(capsys, tmp_path, tiny_model_dir, long_text_file):
    out = tmp_path / "auto"
    code, stdout, err = run_cli(["prune", "--model", tiny_model_dir, "--ratio", "0.34", "--method", "shortgpt",
                                 "--offload", "disk", "--out", out, "--samples", "3", "--seq-len", "16",
                                 "--eval-samples", "2", "--eval-seq-len", "16", "--data", long_text_file,
                                 "--eval-data", long_text_file], capsys)
    assert code == 0, err
    assert json.loads((out / "layershap.json").read_text())["repair"]["recipe"] == "none" and "no repair" in stdout
    code, _, err = run_cli(["prune", "--model", tiny_model_dir, "--ratio", "0.34", "--offload", "disk",
                            "--repair", "scale", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--repair folds into weights" in err


def test_a_model_that_does_not_fit_exits_2_with_the_numbers(capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LAYERSHAP_HOST_BYTES", str(1 << 30))
    code, _, err = run_cli(["ppl", "--model", tiny_model_dir, "--offload", "none"], capsys)
    assert code == 2 and "does not fit" in err and "GB" in err and len(err.strip().splitlines()) == 1


def test_a_streamed_model_refuses_quantize_and_sublayers_before_any_work(capsys, tmp_path, tiny_model_dir):
    for extra, words in ((["--quantize", "int8"], "--quantize needs"), (["--granularity", "sublayer"], "sublayer")):
        code, _, err = run_cli(["prune", "--model", tiny_model_dir, "--ratio", "0.34", "--offload", "disk",
                                "--out", tmp_path / "x", *extra], capsys)
        assert code == 2 and words in err and "streamed" in err, err
