"""Shaped checkpoints: the real shape's tensors by name, a data region that takes no disk and reads as zeros."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from layershap.errors import LayershapError
from layershap.models.shaped import disk_usage, shaped_config, tensor_shapes, write_shaped_checkpoint


def test_llama3_8b_shape_has_its_parameter_count():
    config = shaped_config("llama-3-8b")
    assert sum(shape.numel() for shape, _ in tensor_shapes(config).values()) == 8_030_261_248


def test_unknown_shape_is_a_one_line_error():
    with pytest.raises(LayershapError, match="unknown shape"):
        shaped_config("llama-9")


def test_written_checkpoint_is_sparse_sharded_and_reads_as_zeros(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    tmp_path = tmp_path / "shaped"
    summary = write_shaped_checkpoint(tmp_path, "qwen2.5-7b", num_hidden_layers=2, shard_bytes=10**9,
                                      tokenizer_dir=tmp_path.parent / "tokenizer")
    assert summary["shards"] > 1 and summary["num_hidden_layers"] == 2
    assert disk_usage(tmp_path) < summary["bytes"] / 100
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == summary["bytes"]
    name = "model.layers.1.self_attn.q_proj.bias"
    with safe_open(tmp_path / index["weight_map"][name], framework="pt") as handle:
        tensor = handle.get_tensor(name)
    assert tensor.shape == (3584,) and tensor.dtype == torch.bfloat16 and not tensor.any()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == 152064 and config["num_hidden_layers"] == 2
    assert (tmp_path / "tokenizer.json").is_file()
