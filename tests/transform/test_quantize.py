"""Quantization with torchao: both schemes round-trip through save_pretrained to identical logits with plain
transformers, shrink the model, keep perplexity finite, and every bad input ends in one line and exit 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from conftest import run_cli
from tiny_models import VOCAB, tiny_model

from layershap.errors import LayershapError
from layershap.models.save import save_pruned
from layershap.transform.quantize import (
    check_scheme,
    quantization_of,
    quantize_model,
    save_quantized,
    weight_bytes,
)

pytest.importorskip("torchao")



def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 24), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _tied_llama():
    config = tiny_model("llama").config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _one_line_error(code, err, pattern):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_round_trip_is_exact_and_smaller(scheme, tied, tmp_path, tiny_tokenizer):
    model = _tied_llama() if tied else tiny_model("llama")
    ids = _ids()
    full = _logits(model, ids)
    save_pruned(model, None, tmp_path / "float")
    before = weight_bytes(model)

    quantize_model(model, scheme)
    quantized = _logits(model, ids)
    assert 0 < (quantized - full).abs().max() < 5, "quantization should change the logits a little"
    out = save_quantized(model, tiny_tokenizer, tmp_path / "q", {"method": "test"})

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, ids), quantized, rtol=0, atol=0)
    assert type(reloaded.model.layers[0].mlp.down_proj.weight).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor")
    assert isinstance(reloaded.lm_head.weight, torch.nn.Parameter) and type(reloaded.lm_head.weight) is torch.nn.Parameter
    if tied:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()

    record = json.loads((out / "layershap.json").read_text())
    q = record["quantization"]
    assert record["method"] == "test" and q["scheme"] == scheme and q["method"] == "torchao"
    assert q["quantized_layers"] == 6 * 7 and list(q["float_layers"]) == ["lm_head"]
    assert q["weight_bytes_after"] < 0.6 * before == 0.6 * q["weight_bytes_before"]
    assert q["checkpoint_bytes"] < (tmp_path / "float" / "model.safetensors").stat().st_size
    loss = torch.nn.functional.cross_entropy(_logits(reloaded, ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert math.isfinite(float(loss))
    assert quantization_of(reloaded) == {"method": "torchao"}


def test_quantize_command_and_reload_through_layershap(capsys, tiny_model_dir, long_text_file, tmp_path):
    common = ["--eval-data", long_text_file, "--eval-samples", 2, "--eval-seq-len", 32]
    code, out, err = run_cli(["quantize", "--model", tiny_model_dir, "--scheme", "int8", "--out", tmp_path / "q",
                              *common], capsys)
    assert code == 0, err
    assert "int8: 42 linear layers quantized" in out and "perplexity" in out
    record = json.loads((tmp_path / "q" / "layershap.json").read_text())
    q = record["quantization"]
    assert q["scheme"] == "int8" and set(q["ppl_before"]) == set(q["ppl_after"]) == {str(long_text_file)}
    assert all(math.isfinite(v) for v in q["ppl_after"].values())
    card = (tmp_path / "q" / "README.md").read_text()  # the model card: a quantized, not a pruned, model
    assert "tags:\n- layershap\n- quantized\n- torchao\n" in card and "Quantized with torchao: int8" in card

    code, out, err = run_cli(["ppl", "--model", tmp_path / "q", "--data", long_text_file, "--samples", 2,
                              "--seq-len", 32, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["ppl"][str(long_text_file)] == pytest.approx(q["ppl_after"][str(long_text_file)],
                                                                         rel=1e-6)
    code, _, err = run_cli(["quantize", "--model", tmp_path / "q", "--scheme", "int4", "--out", tmp_path / "qq",
                            *common], capsys)
    _one_line_error(code, err, "already quantized")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_model_quantized_in_half_precision_reloads_in_it(scheme, capsys, tiny_model_dir, long_text_file, tmp_path):
    """Quantized in float16 and reloaded with the CPU's default (float32): torchao's int4 weights dequantize to
    float16 and met float32 activations in a traceback. `auto` now runs a torchao checkpoint in the dtype it was
    quantized in, with the perplexity the quantize run measured; another dtype runs or is one line."""
    common = ["--eval-data", long_text_file, "--eval-samples", 1, "--eval-seq-len", 16]
    code, _, err = run_cli(["quantize", "--model", tiny_model_dir, "--scheme", scheme, "--dtype", "float16",
                            "--out", tmp_path / "q", *common], capsys)
    assert code == 0, err
    measured = json.loads((tmp_path / "q" / "layershap.json").read_text())["quantization"]["ppl_after"]
    ppl = ["ppl", "--model", tmp_path / "q", "--data", long_text_file, "--samples", 1, "--seq-len", 16, "--json"]
    code, out, err = run_cli(ppl, capsys)
    assert code == 0, err
    assert json.loads(out)["ppl"][str(long_text_file)] == pytest.approx(measured[str(long_text_file)], rel=1e-3)
    code, out, err = run_cli([*ppl, "--dtype", "float32"], capsys)
    if code != 0:
        _one_line_error(code, err, "float16")


def test_prune_then_quantize(capsys, tiny_model_dir, long_text_file, tmp_path):
    code, out, err = run_cli(["prune", "--ratio", "0.34", "--method", "shortgpt", "--quantize", "int4",
                              "--model", tiny_model_dir, "--data", long_text_file, "--samples", 2, "--seq-len", 16,
                              "--eval-data", long_text_file, "--eval-samples", 2, "--eval-seq-len", 16,
                              "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    assert "after int4" in out
    record = json.loads((tmp_path / "p" / "layershap.json").read_text())
    assert len(record["removed"]) == 2 and record["quantization"]["scheme"] == "int4"
    assert math.isfinite(next(iter(record["quantization"]["ppl"].values())))
    card = (tmp_path / "p" / "README.md").read_text()
    assert "- pruned\n- layershap\n- quantized\n" in card and f"{record['removed']}" in card
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert reloaded.config.num_hidden_layers == 4
    assert type(reloaded.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"


@pytest.mark.parametrize("args,pattern", [
    (["quantize", "--scheme", "int3", "--out", "x"], "unknown quantization scheme 'int3'"),
    (["prune", "--ratio", "0.5", "--quantize", "fp8", "--out", "x"], "unknown quantization scheme 'fp8'"),
    (["quantize", "--scheme", "int4", "--device", "mps", "--out", "x"], "int4 on mps has no torchao path"),
])
def test_bad_scheme_before_loading(capsys, monkeypatch, tmp_path, args, pattern):
    monkeypatch.chdir(tmp_path)
    _one_line_error(*run_cli(args, capsys)[::2], pattern)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_torchao_missing(capsys, monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.chdir(tmp_path)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    for args in (["quantize", "--scheme", "int8", "--out", "x"], ["prune", "--ratio", "0.5", "--quantize", "int4",
                                                                  "--out", "x"]):
        _one_line_error(*run_cli(args, capsys)[::2], "pip install 'layershap[quant]'")
        assert not (tmp_path / "x").exists()


def test_gpt2_conv1d_is_refused(capsys, tmp_path, tiny_tokenizer):
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # saving may print a progress bar
    code, _, err = run_cli(["quantize", "--model", tmp_path / "gpt2", "--scheme", "int8", "--out", tmp_path / "q",
                            "--eval-data", tmp_path / "none.txt"], capsys)  # refused before reading text
    _one_line_error(code, err, "Conv1D")


def test_int4_keeps_layers_whose_width_does_not_fit_a_group():
    model = tiny_model("mamba")  # dt_proj is read directly (and is 2 wide); x_proj and the rest are quantized
    quantize_model(model, "int4")
    kept = quantization_of(model)["float_layers"]
    assert sorted(kept) == [f"backbone.layers.{i}.mixer.dt_proj" for i in range(6)] + ["lm_head"]
    assert all(type(model.backbone.layers[i].mixer.dt_proj.weight) is torch.nn.Parameter for i in range(6))
    with pytest.raises(LayershapError, match="unknown quantization scheme"):
        check_scheme("int2")
