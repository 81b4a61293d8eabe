"""Checkpoints of real shapes (Llama-3-8B, Llama-3-70B, Qwen2.5-7B, a 1B) that cost no disk.

A safetensors file is an 8-byte header length, a JSON header naming every tensor's dtype, shape and byte
range, and then the bytes. Writing the header and extending the file with `truncate` gives a sparse file:
its data region takes no disk blocks and reads back as zeros, so a 141 GB Llama-3-70B-shaped checkpoint is
a few kilobytes on disk, and loading, streaming, saving and their memory can be measured at that size here.

The weights are all zero, so every mask gives the same NLL (log of the vocabulary): these checkpoints measure
what the data path costs (time, resident and GPU memory), not what a method chooses. Random blocks
generated from a seed as they stream would give distinct NLLs, but a checkpoint that plain transformers reads
differently from layershap would defeat the point of checking that the pruned output loads with plain
transformers; quality is measured on real models (docs/benchmarks.md).

The tokenizer is the embedded default's (SmolLM2's, 49,152 tokens): its ids all lie inside the larger
vocabularies of these shapes, so the config keeps the real vocabulary size and the tokenizer still works
offline.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from layershap.errors import LayershapError

# The published configs' shape fields (Meta's and Qwen's config.json); everything else is the family default.
SHAPES: dict[str, dict] = {
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                   "rope_theta": 500000.0, "tie_word_embeddings": False},
    "llama-3-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                    "rope_theta": 500000.0, "tie_word_embeddings": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                   "rope_theta": 1000000.0, "tie_word_embeddings": False, "max_window_layers": 28,
                   "use_sliding_window": False, "sliding_window": 131072},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True},
}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# Shards of at most this many bytes, as save_pretrained writes them (its default max_shard_size is 5 GB).
SHARD_BYTES = 5 * 10**9
SHAPED_METADATA_KEY = "layershap_shaped"


def shaped_config(shape: str, *, num_hidden_layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                  **overrides):
    """The transformers config of a named shape (`SHAPES`), optionally with fewer blocks (for tests)."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise LayershapError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape])
    if num_hidden_layers is not None:
        fields["num_hidden_layers"] = num_hidden_layers
    if "max_window_layers" in fields:
        fields["max_window_layers"] = fields["num_hidden_layers"]
    fields.update(overrides)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    config.dtype = dtype
    return config


def tensor_shapes(config) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor a checkpoint of this config holds (a tied output embedding once), from a model built on
    the meta device: no memory, and exactly the names and shapes transformers expects."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    state = model.state_dict()
    names = {name for name, _ in model.named_parameters()}  # shared (tied) parameters appear once
    names |= {name for name, _ in model.named_buffers() if name in state}
    return {name: (tensor.shape, tensor.dtype) for name, tensor in state.items() if name in names}


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[torch.Size, torch.dtype]],
                             metadata: dict[str, str] | None = None) -> int:
    """A safetensors file with these tensors' header and a data region that is a hole (zeros); its size."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def write_shaped_checkpoint(out: Path | str, shape: str, *, num_hidden_layers: int | None = None,
                            dtype: torch.dtype = torch.bfloat16, shard_bytes: int = SHARD_BYTES,
                            tokenizer_dir: Path | str | None = None) -> dict:
    """Write config.json, sharded sparse safetensors (with model.safetensors.index.json when there are
    several shards) and a tokenizer (the embedded default's unless `tokenizer_dir`) into `out`; return a
    summary."""
    from layershap.models.load import default_model_dir

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = shaped_config(shape, num_hidden_layers=num_hidden_layers, dtype=dtype)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else default_model_dir()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > config.vocab_size:
        raise LayershapError(f"the default tokenizer has {len(tokenizer)} tokens, more than shape {shape}'s "
                             f"vocabulary of {config.vocab_size}")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    tensors = tensor_shapes(config)
    shards = _shards(tensors, shard_bytes)
    total, weight_map = 0, {}
    metadata = {SHAPED_METADATA_KEY: shape}
    for number, shard in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_sparse_safetensors(out / name, shard, metadata)
        for tensor, (size, tensor_dtype) in shard.items():
            total += int(torch.Size(size).numel()) * torch.empty((), dtype=tensor_dtype).element_size()
            weight_map[tensor] = name
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template")) or item.suffix == ".jinja":
            shutil.copy(item, out / item.name)
    parameters = sum(int(torch.Size(size).numel()) for size, _ in tensors.values())
    return {"shape": shape, "path": str(out), "parameters": parameters, "bytes": total, "shards": len(shards),
            "num_hidden_layers": config.num_hidden_layers, "dtype": str(dtype).removeprefix("torch.")}


def _shards(tensors: dict, shard_bytes: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for name, (shape, dtype) in tensors.items():
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = (shape, dtype)
        size += nbytes
    shards.append(current)
    return shards


def disk_usage(path: Path | str) -> int:
    """Bytes of disk the files under `path` really take (st_blocks), as opposed to their apparent size."""
    return sum(item.stat().st_blocks * 512 for item in Path(path).rglob("*") if item.is_file())
