"""Mamba, Mamba2 and RWKV through the command line, as any transformer: estimate, prune (ShortGPT and Shapley),
ppl, and pruned checkpoints that plain transformers reloads to the same perplexity.

The tiny RWKV is saved with `rescale_every=2` (the upstream default is 6): `load_model` must set it to 0 before
the first forward pass, or its blocks could not be skipped exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from conftest import run_cli
from tiny_models import tiny_model

FAMILIES = ["mamba", "mamba2", "rwkv"]
WINDOWS = ["--samples", 2, "--seq-len", 16]



@pytest.fixture(scope="module", params=FAMILIES)
def recurrent_dir(request, tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return request.param, path


def _common(model_dir, text):
    return ["--model", model_dir, "--data", text, "--eval-data", text, "--eval-samples", 2, "--eval-seq-len", 16]


def _check_pruned(capsys, out, text, family, n_kept):
    record = json.loads((out / "layershap.json").read_text())
    assert record["model_type"] == family and len(record["kept"]) == n_kept
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == n_kept
    if family == "rwkv":
        assert config.rescale_every == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no layershap
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.arange(12)[None]).logits).all()
    code, stdout, err = run_cli(["ppl", "--model", out, "--data", text, "--samples", 2, "--seq-len", 16, "--json"],
                                capsys)
    assert code == 0, err
    ppl = json.loads(stdout)["ppl"][str(text)]
    assert math.isfinite(ppl) and ppl == pytest.approx(record["ppl_after"][str(text)], rel=1e-6)
    return record


def test_prune_shortgpt(capsys, recurrent_dir, long_text_file, tmp_path):
    family, model_dir = recurrent_dir
    code, out, err = run_cli(["prune", "--ratio", "0.34", "--method", "shortgpt", *WINDOWS,
                              *_common(model_dir, long_text_file), "--out", tmp_path / "sg"], capsys)
    assert code == 0, err
    assert "removed 2 of 6 blocks" in out
    record = _check_pruned(capsys, tmp_path / "sg", long_text_file, family, 4)
    assert record["ppl_after"][str(long_text_file)] != record["ppl_before"][str(long_text_file)]


def test_prune_shapley_and_estimate(capsys, recurrent_dir, long_text_file, tmp_path):
    family, model_dir = recurrent_dir
    code, out, err = run_cli(["prune", "--ratio", "0.34", "--method", "shapley", "--budget", 20, *WINDOWS,
                              *_common(model_dir, long_text_file), "--out", tmp_path / "sh"], capsys)
    assert "removed 2 of 6 blocks" in out
    assert code == 0, err
    record = _check_pruned(capsys, tmp_path / "sh", long_text_file, family, 4)
    full_pass = 2 * 16 * (6 + 1)  # token-passes of one pass of the 6-block model over 2 x 16 tokens
    assert 0 < record["cost"]["token_passes"] <= (20 + 1) * full_pass  # the budget, plus the traced pass

    code, _, err = run_cli(["estimate", "--budget", 20, *WINDOWS, "--model", model_dir, "--data", long_text_file,
                            "--out", tmp_path / "est"], capsys)
    assert code == 0, err
    shapley = json.loads((tmp_path / "est" / "shapley.json").read_text())
    assert [e["index"] for e in shapley["layers"]] == list(range(6))
    assert all(math.isfinite(e["shapley"]) for e in shapley["layers"])


def test_prune_and_quantize(capsys, recurrent_dir, long_text_file, tmp_path):
    pytest.importorskip("torchao")
    family, model_dir = recurrent_dir
    code, _, err = run_cli(["prune", "--ratio", "0.34", "--method", "last", "--quantize", "int8", *WINDOWS,
                            *_common(model_dir, long_text_file), "--out", tmp_path / "q"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "q" / "layershap.json").read_text())
    q = record["quantization"]
    assert q["scheme"] == "int8" and q["quantized_layers"] > 0
    if family == "mamba":  # read directly by the mixer: stays in float
        assert sum(name.endswith("dt_proj") for name in q["float_layers"]) == 4
    code, stdout, err = run_cli(["ppl", "--model", tmp_path / "q", "--data", long_text_file, "--samples", 2,
                                 "--seq-len", 16, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["ppl"][str(long_text_file)] == pytest.approx(q["ppl"][str(long_text_file)], rel=1e-6)


def test_quantize_that_does_not_apply_is_one_line(capsys, monkeypatch, tiny_tokenizer, long_text_file, tmp_path):
    """Mamba reads dt_proj's weight directly; had layershap not kept it in float, int8 would fail in the forward
    pass, and the user gets one line saying the option does not apply."""
    pytest.importorskip("torchao")
    import layershap.transform.quantize

    tiny_model("mamba").save_pretrained(tmp_path / "mamba")
    tiny_tokenizer.save_pretrained(tmp_path / "mamba")
    monkeypatch.setattr(layershap.transform.quantize, "DIRECT_WEIGHT_READS", {})
    capsys.readouterr()
    code, _, err = run_cli(["quantize", "--model", tmp_path / "mamba", "--scheme", "int8", "--out", tmp_path / "q",
                            "--eval-data", long_text_file, "--eval-samples", 1, "--eval-seq-len", 16], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "--quantize int8 does not apply to this mamba model" in lines[0]
    assert "Int8Tensor does not implement aten.matmul" in lines[0]
