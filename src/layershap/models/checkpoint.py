"""What a safetensors checkpoint holds, read from its headers alone: no tensor data is touched.

The memory check (`models/memory.py`) needs the parameter count and dtype before deciding how to load, and
the streamed paths (`models/stream.py`, `models/stream_save.py`) need to know which shard holds which tensor;
both come from the JSON header at the start of every shard (and `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from layershap.errors import LayershapError

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """file, dtype, shape, and where its bytes start in the file (`offset`, from the file's beginning)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a checkpoint directory by name: its shard, dtype and shape."""

    directory: Path
    tensors: dict[str, TensorEntry]

    @property
    def parameters(self) -> int:
        return sum(entry.numel for entry in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype most of the parameters are stored in."""
        counts: Counter = Counter()
        for entry in self.tensors.values():
            if entry.dtype.is_floating_point:
                counts[entry.dtype] += entry.numel
        return counts.most_common(1)[0][0] if counts else torch.float32

    @property
    def files(self) -> list[Path]:
        return sorted({entry.file for entry in self.tensors.values()})


def has_safetensors(directory: Path | str) -> bool:
    directory = Path(directory)
    return (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file()


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, data_offsets) and where its data
    region starts."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise LayershapError(f"{path} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def read_tensor(handle, entry: TensorEntry) -> torch.Tensor:
    """One tensor's bytes read (not mapped) from an open file into fresh memory: a mapped page counts as
    resident while the file stays open, so reading keeps a streamed run's resident memory to what it holds."""
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    if entry.nbytes:
        handle.seek(entry.offset)
        view = memoryview(raw.numpy())
        done = 0
        while done < entry.nbytes:
            got = handle.readinto(view[done:])
            if not got:
                raise LayershapError(f"{entry.file} ends before its tensor data does; the file is truncated")
            done += got
    return raw.view(entry.dtype).reshape(entry.shape)


def checkpoint_index(directory: Path | str) -> CheckpointIndex:
    """The index of a save_pretrained directory's safetensors (one file, or shards with an index)."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        files = sorted({directory / name for name in weight_map.values()})
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        raise LayershapError(f"{directory} holds no safetensors checkpoint ({SINGLE_FILE} or {INDEX_FILE})")
    tensors = {}
    for file in files:
        header, start = read_header(file)
        for name, info in header.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise LayershapError(f"{file}: tensor {name} has dtype {info['dtype']}, which layershap does "
                                     "not stream")
            tensors[name] = TensorEntry(file, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                        start + info["data_offsets"][0])
    return CheckpointIndex(directory, tensors)
