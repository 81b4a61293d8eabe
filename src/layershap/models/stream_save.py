"""Save a pruned checkpoint without holding the model: the kept blocks' tensors copied from the source shards.

Every tensor outside the blocks is copied as it is stored; each kept block's tensors are copied under their
new position (`model.layers.7.` becomes `model.layers.5.` when two earlier blocks went), and the config's
block count, per-layer lists and boundaries are cut the way `prune_layers` cuts them in memory, as the GGUF
writer does for a GGUF. Tensors are read one at a time from the shards and written in their
stored dtype, so a 70B is pruned on a machine that cannot load it; the bytes are the source's, so the result
equals `save_pretrained` of the model pruned in memory (tests/models/test_stream.py loads both with plain
transformers and compares logits). A run of zeros is left as a hole in the output (the shaped checkpoints of
`models/shaped.py` stay sparse when pruned).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from layershap.errors import LayershapError
from layershap.models.architectures import Architecture
from layershap.models.checkpoint import INDEX_FILE, SINGLE_FILE, checkpoint_index, read_tensor
from layershap.models.shaped import SAFETENSORS_DTYPES

SHARD_BYTES = 5 * 10**9
_CHUNK_BYTES = 64 << 20


def cut_config(config: dict, arch: Architecture, kept: list[int], n: int) -> dict:
    """config.json's values for the kept blocks: the block count, the per-layer lists sliced, the boundary
    indices recounted, and the family's `save_config` (the same edit as `models/layers.py` makes in memory)."""
    config = dict(config)
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), None)
    if key is None or config[key] != n:
        raise LayershapError(f"config.json says {config.get(key)} blocks but the checkpoint holds {n}")
    config[key] = len(kept)
    for list_key in arch.per_layer_config:
        value = config.get(list_key)
        if isinstance(value, list) and len(value) == n:
            config[list_key] = [value[i] for i in kept]
    for bound_key in arch.boundary_config:
        value = config.get(bound_key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
            config[bound_key] = sum(1 for i in kept if i < value)
    config.update(arch.save_config)
    return config


def save_streamed(source: Path | str, out: Path | str, kept: list[int], arch: Architecture, *,
                  shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the checkpoint of `source` with only the `kept` blocks (original indices) into `out`: shards,
    index and config.json. Returns what was written."""
    source, out = Path(source), Path(out)
    index = checkpoint_index(source)
    prefix = arch.blocks + "."
    positions = sorted({int(name[len(prefix):].split(".", 1)[0]) for name in index.tensors if name.startswith(prefix)})
    n = len(positions)
    if positions != list(range(n)):
        raise LayershapError(f"the checkpoint in {source} does not number its blocks 0..{n - 1}")
    if not kept or any(not 0 <= i < n for i in kept):
        raise LayershapError(f"kept blocks must be some of 0..{n - 1}; got {kept}")
    renumber = {old: new for new, old in enumerate(sorted(kept))}
    plan: list[tuple[str, str]] = []  # (new name, source name)
    for name in index.tensors:
        if name.startswith(prefix):
            position, rest = name[len(prefix):].split(".", 1)
            if int(position) in renumber:
                plan.append((f"{prefix}{renumber[int(position)]}.{rest}", name))
        else:
            plan.append((name, name))
    out.mkdir(parents=True, exist_ok=True)
    shards = _shards(plan, index, shard_bytes)
    weight_map, total = {}, 0
    handles: dict = {}
    try:
        for number, shard in enumerate(shards, start=1):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            total += _write_shard(out / file, shard, index, handles)
            weight_map.update(dict.fromkeys((new for new, _ in shard), file))
    finally:
        for handle in handles.values():
            handle.close()
    if len(shards) > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    config = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cut_config(config, arch, sorted(kept), n), indent=2) + "\n")
    for extra in ("generation_config.json",):
        if (source / extra).is_file():
            (out / extra).write_bytes((source / extra).read_bytes())
    return {"kept": sorted(kept), "tensors": len(plan), "bytes": total, "shards": len(shards)}


def _shards(plan, index, shard_bytes):
    shards, current, size = [], [], 0
    for new, old in plan:
        nbytes = index.tensors[old].nbytes
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((new, old))
        size += nbytes
    shards.append(current)
    return shards


def _write_shard(path: Path, shard, index, handles: dict) -> int:
    """One safetensors file: header first (every size is known), then each tensor's bytes as read."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for new, old in shard:
        entry = index.tensors[old]
        header[new] = {"dtype": SAFETENSORS_DTYPES.get(entry.dtype) or _dtype_name(entry.dtype),
                       "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for _, old in shard:
            entry = index.tensors[old]
            reader = handles.get(entry.file)
            if reader is None:
                reader = handles[entry.file] = open(entry.file, "rb")  # noqa: SIM115 - closed by the caller
            flat = read_tensor(reader, entry).reshape(-1).view(torch.uint8)
            for start in range(0, flat.numel(), _CHUNK_BYTES):
                chunk = flat[start:start + _CHUNK_BYTES]
                if chunk.any():
                    handle.write(memoryview(chunk.numpy()))
                else:  # zeros: leave a hole
                    handle.seek(chunk.numel(), 1)
        handle.truncate(8 + len(raw) + offset)
    return offset


def _dtype_name(dtype: torch.dtype) -> str:
    from layershap.models.checkpoint import SAFETENSORS_DTYPES as NAMES

    for name, value in NAMES.items():
        if value == dtype:
            return name
    raise LayershapError(f"cannot write a tensor of dtype {dtype}")
