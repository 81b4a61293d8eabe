"""A directory saved with single sublayers removed: layershap's modeling file and `auto_map` are written by
every save (prune, heal, quantize all go through `save_pruned`), `load_model` trusts that file without
--trust-remote-code only when it is exactly layershap's own, and the card tells plain transformers users to
pass trust_remote_code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from conftest import SUBLAYERS_REMOVED
from tiny_models import tiny_model

from layershap.errors import LayershapError
from layershap.models.load import load_model
from layershap.models.save_sublayers import MODELING_FILE, modeling_source, own_remote_code

IDS = torch.arange(1, 17)[None]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_own_remote_code_tells_ours_from_others(sublayer_model_dir, tiny_model_dir, tmp_path):
    assert own_remote_code(sublayer_model_dir) is True
    assert own_remote_code(tiny_model_dir) is None  # plain transformers
    assert own_remote_code(tmp_path) is None  # no config at all
    edited = shutil.copytree(sublayer_model_dir, tmp_path / "edited")
    (edited / MODELING_FILE).write_text(modeling_source("LlamaForCausalLM") + "import os\n")
    assert own_remote_code(edited) is False
    (edited / MODELING_FILE).unlink()
    assert own_remote_code(edited) is False
    config = json.loads((edited / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "modeling_layershap.X(BASE):\n    pass\nclass Y"
    (edited / "config.json").write_text(json.dumps(config))
    assert own_remote_code(edited) is False  # a class name that is not a plain name is never rendered


def test_load_model_trusts_only_layershaps_own_file(sublayer_model_dir, tmp_path):
    model, tokenizer = load_model(str(sublayer_model_dir), device="cpu")
    assert type(model).__module__.endswith("modeling_layershap") and tokenizer is not None
    assert model.config.layershap_removed_sublayers == ["attn.0", "mlp.2", "attn.4"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(sublayer_model_dir, trust_remote_code=True).eval()
    assert torch.equal(logits(model), logits(reference))

    edited = shutil.copytree(sublayer_model_dir, tmp_path / "edited")
    with (edited / MODELING_FILE).open("a") as f:
        f.write("# edited\n")
    with pytest.raises(LayershapError, match="--trust-remote-code if you trust it") as refused:
        load_model(str(edited), device="cpu")
    assert "\n" not in str(refused.value)
    trusted, _ = load_model(str(edited), device="cpu", trust_remote_code=True)
    assert torch.equal(logits(trusted), logits(reference))


def test_saving_a_loaded_sublayer_model_keeps_its_modeling_file(sublayer_model_dir, tmp_path):
    from layershap.models.save import save_pruned

    model, tokenizer = load_model(str(sublayer_model_dir), device="cpu")
    out = save_pruned(model, tokenizer, tmp_path / "again", {"model": str(sublayer_model_dir)})
    assert own_remote_code(out) is True
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_layershap.LlamaForCausalLM"}
    again, _ = load_model(str(out), device="cpu")
    assert torch.equal(logits(again), logits(model))


def test_card_of_a_sublayer_directory(sublayer_model_dir, tmp_path):
    from layershap.models.save import save_pruned

    card = (sublayer_model_dir / "README.md").read_text()
    assert 'from_pretrained("path/to/this/directory", trust_remote_code=True)' in card
    assert f"Removed 5 attention and MLP sublayers of 6 blocks (original block indices): " \
           f"{', '.join(SUBLAYERS_REMOVED)}" in card
    assert "(5 sublayers removed)" in card
    plain = save_pruned(tiny_model("llama"), None, tmp_path / "plain", {"model": "x", "removed": [1], "n_layers": 6})
    assert "trust_remote_code" not in (plain / "README.md").read_text()
