"""GGUF in, GGUF out: the pruned file holds the kept blocks byte for byte, and what reads it (transformers,
llama.cpp) gets the model the blocks were chosen on, with those blocks skipped.

Nothing here trusts the writer: the expected tensors are derived from the input file with the gguf reader,
and the models are loaded by transformers itself (`from_pretrained(..., gguf_file=...)`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from gguf import GGUFReader, GGUFValueType
from tiny_gguf import write_tiny_gguf
from tiny_models import COMMON, VOCAB, tiny_model

from layershap.models.layers import keep_only
from layershap.transform.gguf_export import exportable_architectures, write_pruned_gguf

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))  # longer than the windows (8)


def load_gguf(path: Path):
    """transformers' own GGUF loader, dequantizing to float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def value(reader, key):
    field = reader.fields[key]
    return field.contents()


def assert_blocks_copied(source: Path, out: Path, removed: list[int]) -> None:
    """Every kept tensor is in `out` under its renumbered name with the original type, shape and bytes; every
    non-block tensor unchanged; nothing else."""
    a, b = GGUFReader(str(source)), GGUFReader(str(out))
    arch = value(a, "general.architecture")
    n = value(a, f"{arch}.block_count")
    kept = [i for i in range(n) if i not in removed]
    expected = {}
    for tensor in a.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk":
            if int(parts[1]) in removed:
                continue
            parts[1] = str(kept.index(int(parts[1])))
        expected[".".join(parts)] = tensor
    got = {tensor.name: tensor for tensor in b.tensors}
    assert sorted(got) == sorted(expected)
    for name, original in expected.items():
        copy = got[name]
        assert copy.tensor_type == original.tensor_type, name
        assert list(copy.shape) == list(original.shape), name
        assert copy.data.tobytes() == original.data.tobytes(), name
    assert value(b, f"{arch}.block_count") == len(kept)


def check_exact(source: Path, out: Path, removed: list[int], n: int) -> None:
    dense, pruned = load_gguf(source), load_gguf(out)
    assert pruned.config.num_hidden_layers == n - len(removed)
    with torch.no_grad():
        with keep_only(dense, [i for i in range(n) if i not in removed]):
            expected = dense(input_ids=IDS).logits
        got = pruned(input_ids=IDS).logits
    assert torch.equal(got, expected)


# -- tiny models of every family the export supports ---------------------------------------------------------

TINY = {
    "llama": lambda: tiny_model("llama"),
    "qwen2": lambda: tiny_model("qwen2"),
    # transformers reads no head_dim for qwen3 from a GGUF, so the file must use the default 128
    "qwen3": lambda: transformers.Qwen3Config(**{**COMMON, "num_attention_heads": 2, "num_key_value_heads": 1},
                                              head_dim=128),
    "phi3": lambda: tiny_model("phi3"),
    "gemma2": lambda: tiny_model("gemma2"),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 12}, head_dim=8,
                                                         sliding_window=8),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4),
    "starcoder2": lambda: transformers.Starcoder2Config(**COMMON),
    "mamba": lambda: tiny_model("mamba"),
}
# Gemma 3: transformers makes every sixth block (5, 11) full attention by position. This removal drops block 5
# and brings block 11 to position 5, so transformers reads the pruned file as the skipped model.
REMOVED = {"gemma3_text": [1, 3, 5, 6, 8, 10]}


def _tiny(model_type):
    made = TINY[model_type]()
    if isinstance(made, transformers.PretrainedConfig):
        torch.manual_seed(0)
        made = transformers.AutoModelForCausalLM.from_config(made).eval()
    return made


def test_every_exportable_architecture_is_tested_here():
    assert {"gemma3" if t == "gemma3_text" else t for t in TINY} | {"qwen2moe", "qwen3moe"} \
        == set(exportable_architectures())


@pytest.mark.parametrize("model_type", list(TINY))
def test_pruned_tiny_gguf_is_the_skipped_model_exactly(model_type, tmp_path):
    model = _tiny(model_type)
    n = model.config.num_hidden_layers
    source = write_tiny_gguf(model, tmp_path / "in.gguf")
    removed = REMOVED.get(model_type, [1, 2])
    info = write_pruned_gguf(source, tmp_path / "out.gguf", removed)
    assert info["kept"] == [i for i in range(n) if i not in removed] and info["notes"] == []
    assert_blocks_copied(source, tmp_path / "out.gguf", removed)
    assert Counter(t.tensor_type.name for t in GGUFReader(str(tmp_path / "out.gguf")).tensors)["Q8_0"] > 0
    check_exact(source, tmp_path / "out.gguf", removed, n)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sliding_window_pattern_follows_the_kept_blocks_for_llama_cpp(model_type, tmp_path):
    """llama.cpp places Gemma's sliding-window blocks by position unless the file lists them per block; when
    a removal moves them, the export lists them, as the skipped model has them."""
    model = tiny_model(model_type)
    source = write_tiny_gguf(model, tmp_path / "in.gguf")
    removed = [1] if model_type == "gemma2" else [1, 2]  # both shift a full-attention block's position
    info = write_pruned_gguf(source, tmp_path / "out.gguf", removed)
    dense = load_gguf(source)
    n = dense.config.num_hidden_layers
    period = 2 if model_type == "gemma2" else 6
    # the positional rule the export assumes is the one transformers applies to the original file
    assert [t == "sliding_attention" for t in dense.config.layer_types] == \
        [i % period < period - 1 for i in range(n)]
    with keep_only(dense, [i for i in range(n) if i not in removed]):
        expected = [t == "sliding_attention" for t in dense.config.layer_types]
    arch = "gemma3" if model_type == "gemma3_text" else model_type
    assert value(GGUFReader(str(tmp_path / "out.gguf")), f"{arch}.attention.sliding_window_pattern") == expected
    assert len(info["notes"]) == 1 and "transformers" in info["notes"][0]


def test_per_layer_metadata_arrays_are_sliced(tmp_path):
    A, U32, I32 = GGUFValueType.ARRAY, GGUFValueType.UINT32, GGUFValueType.INT32
    extra = {"llama.attention.head_count_kv": ([2, 2, 1, 2, 1, 2], (A, U32)),
             "llama.feed_forward_length": ([64, 64, 32, 64, 32, 16], (A, U32)),
             "llama.rope.dimension_sections": ([1, 2, 3, 4, 5, 6], (A, I32)),  # not per block
             "general.languages": (["en", "fr", "de", "es", "it", "nl"], (A, GGUFValueType.STRING)),
             "general.tags": (["tiny"], (A, GGUFValueType.STRING))}
    source = write_tiny_gguf(tiny_model("llama"), tmp_path / "in.gguf", extra_keys=extra)
    info = write_pruned_gguf(source, tmp_path / "out.gguf", [0, 4], {"method": "shortgpt", "forward_passes": 1,
                                                                    "ppl_before": {"wiki": 10.0},
                                                                    "ppl_after": {"wiki": 12.5}})
    out = GGUFReader(str(tmp_path / "out.gguf"))
    assert value(out, "llama.attention.head_count_kv") == [2, 1, 2, 2]
    assert value(out, "llama.feed_forward_length") == [64, 32, 64, 16]
    assert value(out, "llama.rope.dimension_sections") == [1, 2, 3, 4, 5, 6]
    assert value(out, "general.languages") == ["en", "fr", "de", "es", "it", "nl"]
    assert value(out, "general.tags") == ["tiny", "pruned", "layershap"]
    assert sorted(info["sliced_metadata"]) == ["llama.attention.head_count_kv", "llama.feed_forward_length"]
    assert value(out, "layershap.removed_blocks") == [0, 4]
    assert value(out, "layershap.kept_blocks") == [1, 2, 3, 5]
    assert value(out, "layershap.method") == "shortgpt" and value(out, "layershap.forward_passes") == 1
    assert value(out, "layershap.ppl_after.wiki") == 12.5 and value(out, "layershap.base_block_count") == 6
    source_reader = GGUFReader(str(source))
    for key in source_reader.fields:  # everything else carried over unchanged
        if not key.startswith("GGUF.") and key not in extra and key != "llama.block_count":
            assert value(out, key) == value(source_reader, key), key
