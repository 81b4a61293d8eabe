"""Sublayer plans of Llama-family models as Nemotron-NAS (DeciLMForCausalLM) directories: the config and
weight names vLLM's nemotron_nas loader reads, no tensors for removed parts, and a reloaded model whose logits
equal the in-memory skipped model's."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import run_cli
from safetensors import safe_open
from tiny_models import tiny_model

from layershap.errors import LayershapError
from layershap.evaluate.perplexity import perplexities
from layershap.models.save_decilm import check_decilm, ffn_mult_for, save_decilm
from layershap.models.save_sublayers import own_remote_code
from layershap.models.sublayers import keep_sublayers, remove_sublayers, sublayer_names

IDS = torch.arange(1, 21)[None]


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def vllm_expected_names(config: dict) -> set[str]:
    """The tensor names vLLM's DeciLMForCausalLM has parameters for, read off its module construction: per
    block, self_attn.{q,k,v,o}_proj + input_layernorm unless attention.no_op, mlp.{gate,up,down}_proj +
    post_attention_layernorm unless ffn.no_op; the embedding, final norm, and the head unless tied."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.get("tie_word_embeddings"):
        names.add("lm_head.weight")
    for i, block in enumerate(config["block_configs"]):
        p = f"model.layers.{i}."
        if not block["attention"]["no_op"]:
            names |= {p + "input_layernorm.weight", *(p + f"self_attn.{m}_proj.weight" for m in "qkvo")}
        if not block["ffn"]["no_op"]:
            names |= {p + "post_attention_layernorm.weight", *(p + f"mlp.{m}_proj.weight" for m in
                                                                ("gate", "up", "down"))}
    return names


def saved_names(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family, removed", [
    ("llama", ["mlp.0", "attn.2", "attn.3", "mlp.3", "mlp.4", "attn.5"]),
    ("llama", ["attn.0", "mlp.1", "attn.4"]),  # the first block's attention: written as a zero one
    ("mistral", ["attn.1", "mlp.2", "attn.2", "mlp.5"]),
])
def test_decilm_directory_is_the_skipped_model(family, removed, tmp_path, tiny_tokenizer):
    config = transformers.MistralConfig if family == "mistral" else None
    model = tiny_model(family)
    if config is not None:
        model.config.sliding_window = None
    mask = np.array([name not in removed for name in sublayer_names(6)])
    with keep_sublayers(model, mask):
        expected = logits(model)
    remove_sublayers(model, mask)
    info = save_decilm(model, tiny_tokenizer, tmp_path / "deci", {"granularity": "sublayer"})
    saved = json.loads((tmp_path / "deci" / "config.json").read_text())
    assert saved["model_type"] == "nemotron-nas" and saved["architectures"] == ["DeciLMForCausalLM"]
    assert len(saved["block_configs"]) == saved["num_hidden_layers"] == model.config.num_hidden_layers
    assert not any(key.startswith("layershap") for key in saved) and "kv_sharing_modes" not in saved
    names = saved_names(tmp_path / "deci")
    assert names == vllm_expected_names(saved)  # exactly the parameters vLLM builds, nothing of a no-op part
    zero_first = "attn.0" in removed and "mlp.0" not in removed
    assert info["zero_attention_blocks"] == ([0] if zero_first else [])
    if zero_first:
        assert saved["block_configs"][0]["attention"] == {"no_op": False, "replace_with_linear": False,
                                                          "n_heads_in_group": 4}  # one KV head
        with safe_open(str(tmp_path / "deci" / "model.safetensors"), "pt") as f:
            assert not f.get_tensor("model.layers.0.self_attn.o_proj.weight").any()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deci", trust_remote_code=True).eval()
    assert type(reloaded).__name__ == "DeciLMForCausalLM"
    assert torch.equal(logits(reloaded), expected)
    # generation with a cache: the removed attentions keep none
    with torch.no_grad():
        out = reloaded(input_ids=IDS, use_cache=True)
    kept = sum(not b["attention"]["no_op"] for b in saved["block_configs"])
    assert sum(layer.keys is not None and layer.keys.numel() > 0 for layer in out.past_key_values.layers
               if hasattr(layer, "keys")) == kept
    assert own_remote_code(tmp_path / "deci") is True  # ours, byte for byte


def test_ffn_mult_is_written_only_where_decilm_rounds_back_exactly():
    assert ffn_mult_for(1536, 576) == 4.0  # SmolLM2-135M
    assert ffn_mult_for(14336, 4096) == 5.25  # Llama 3 8B
    assert ffn_mult_for(64, 32) is None  # the tiny model: DeciLM rounds to 256, so intermediate_size only


def test_families_decilm_cannot_express_are_refused():
    with pytest.raises(LayershapError, match="Llama-family blocks"):
        check_decilm(tiny_model("qwen2"))
    with pytest.raises(LayershapError, match="sliding window of 8 tokens"):
        check_decilm(tiny_model("mistral"))


def test_cli_writes_decilm(capsys, tiny_model_dir, long_text_file, tmp_path):
    out = tmp_path / "deci"
    common = ["--model", tiny_model_dir, "--data", long_text_file, "--eval-data", long_text_file,
              "--eval-samples", 2, "--eval-seq-len", 16, "--samples", 2, "--seq-len", 16]
    code, _, err = run_cli(["prune", "--granularity", "sublayer", "--ratio", "0.25", "--budget", 40,
                            "--format", "decilm", *common, "--out", out], capsys)
    assert code == 0, err
    record = json.loads((out / "layershap.json").read_text())
    assert record["decilm"]["format"] == "decilm"
    assert any(b["attention"]["no_op"] != b["ffn"]["no_op"] for b in json.loads(
        (out / "config.json").read_text())["block_configs"])  # single sublayers removed
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ppl = perplexities(reloaded, tokenizer, [str(long_text_file)], samples=2, seq_len=16)[str(long_text_file)]
    assert ppl == pytest.approx(record["ppl_after"][str(long_text_file)], rel=1e-5)
    # layershap's own commands load it without --trust-remote-code (its modeling file is layershap's own)
    assert own_remote_code(out) is True
    capsys.readouterr()  # what loading printed above
    code, printed, err = run_cli(["ppl", "--model", out, "--data", long_text_file, "--samples", 2, "--seq-len", 16,
                                  "--json"], capsys)
    assert code == 0, err
    assert json.loads(printed)["ppl"][str(long_text_file)] == pytest.approx(ppl, rel=1e-6)
    # heal it: the LoRA merged back, the DeciLM layout and its modeling file kept
    if importlib.util.find_spec("peft") is not None:
        healed = tmp_path / "deci-healed"
        code, _, err = run_cli(["heal", "--model", out, "--data", long_text_file, "--steps", 2, "--samples", 4,
                                "--seq-len", 16, "--batch-size", 2, "--eval-data", long_text_file, "--eval-samples", 2,
                                "--eval-seq-len", 16, "--out", healed], capsys)
        assert code == 0, err
        assert own_remote_code(healed) is True
        source = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        again_loaded = transformers.AutoModelForCausalLM.from_pretrained(healed, trust_remote_code=True)
        assert sorted(again_loaded.state_dict()) == sorted(source.state_dict())
    # and prune it again by whole blocks: block_configs stays one entry per block, the file still loads
    again = tmp_path / "deci-blocks"
    code, _, err = run_cli(["prune", "--method", "shortgpt", "--ratio", "0.34", *common, "--model", out,
                            "--out", again], capsys)
    assert code == 0, err
    record = json.loads((again / "layershap.json").read_text())
    config = json.loads((again / "config.json").read_text())
    blocks_before = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert len(config["block_configs"]) == config["num_hidden_layers"] == blocks_before - len(record["removed"])
    assert config["block_configs"] == [b for i, b in enumerate(json.loads((out / "config.json").read_text())[
        "block_configs"]) if i not in record["removed"]]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True).eval()
    ppl = perplexities(reloaded, tokenizer, [str(long_text_file)], samples=2, seq_len=16)[str(long_text_file)]
    assert ppl == pytest.approx(record["ppl_after"][str(long_text_file)], rel=1e-5)
    code, _, err = run_cli(["prune", "--ratio", "0.25", "--format", "decilm", *common, "--out", tmp_path / "x"],
                           capsys)
    assert code == 2 and "add --granularity sublayer" in err and err.count("\n") == 1
