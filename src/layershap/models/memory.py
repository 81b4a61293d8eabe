"""Decide, before loading anything, whether a model fits: load it whole, stream its blocks, or stop and say why.

What the model needs comes from its checkpoint's headers (`models/checkpoint.py`: parameters and stored
dtype) in the dtype the run asks for, plus the activations of one batch of windows (the hidden states and,
largest for big vocabularies, the float32 logits). What there is comes from the device (free GPU memory,
`torch.cuda.mem_get_info`) and the host (MemAvailable). Loading a model that does not fit ends in a kernel
kill with no message; this check answers in one line naming the numbers and the fix instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from layershap.errors import LayershapError

OFFLOADS = ("auto", "none", "cpu", "disk")
# Room left for everything that is not weights or the batch (the interpreter, torch, tokenizer, caches).
HOST_RESERVE_BYTES = 1 << 30
DEVICE_RESERVE_BYTES = 1 << 30
# Blocks a streamed model keeps resident (models/stream.py) and so needs room for.
RESIDENT_BLOCKS = 1
GB = 1e9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # as load.py's


@dataclass(frozen=True)
class MemoryPlan:
    """How to load: `stream` False (whole model on the device) or True (blocks streamed from `offload`,
    "cpu" or "disk"), in `dtype`; `note` says what was chosen and why when it is not the plain load."""

    dtype: torch.dtype
    stream: bool = False
    offload: str = "none"
    note: str | None = None
    needed_bytes: int = 0
    available_bytes: int | None = None


def check_offload(offload: str) -> str:
    if offload not in OFFLOADS:
        raise LayershapError(f"unknown --offload {offload!r}; use one of {', '.join(OFFLOADS)}")
    return offload


def host_available_bytes() -> int | None:
    """Memory the host can give without swapping (MemAvailable), or None where it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes() if device.type == "cpu" else None


def activation_bytes(config, *, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """A generous bound on one batch's activations: a few hidden-size and intermediate-size tensors, and the
    logits in the run dtype plus their float32 copy and log-softmax."""
    tokens = batch_size * seq_len
    size = torch.empty((), dtype=dtype).element_size()
    hidden = getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)
    intermediate = getattr(config, "intermediate_size", 0) or 4 * hidden
    vocab = getattr(config, "vocab_size", 0)
    return tokens * (size * (6 * hidden + 3 * intermediate) + vocab * (size + 8))


def plan_memory(*, parameters: int, block_parameters: int, outside_parameters: int, config, dtype: str,
                device: torch.device, offload: str = "auto", batch_size: int = 8, seq_len: int = 256,
                host_bytes: int | None = None, device_bytes: int | None = None) -> MemoryPlan:
    """Load, stream or stop (a `LayershapError` naming the numbers and the fix).

    dtype: as the command line gives it; "auto" is float32 on a CPU (bfloat16 is slow there) and the
    checkpoint's dtype on a GPU; on a CPU where float32 fits only streamed, auto streams in float32.
    block_parameters: of the largest block; outside_parameters: the embeddings, final norm and head.
    host_bytes, device_bytes: what is free (read from the machine when None).
    """
    check_offload(offload)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = DTYPES.get(stored, torch.bfloat16) if isinstance(stored, str) else (stored or torch.float32)
    if dtype == "auto":
        chosen = torch.float32 if device.type == "cpu" else stored
    elif dtype in DTYPES:
        chosen = DTYPES[dtype]
    else:
        raise LayershapError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    host = host_bytes if host_bytes is not None else host_available_bytes()
    free = device_bytes if device_bytes is not None else (
        host if device.type == "cpu" else device_available_bytes(device))

    def size(count: int, of: torch.dtype) -> int:
        return count * torch.empty((), dtype=of).element_size()

    acts = activation_bytes(config, batch_size=batch_size, seq_len=seq_len, dtype=chosen)
    whole = size(parameters, chosen)
    streamed = size(outside_parameters + RESIDENT_BLOCKS * block_parameters, chosen)
    reserve = DEVICE_RESERVE_BYTES if device.type == "cuda" else HOST_RESERVE_BYTES
    batch = f"batch {batch_size} x {seq_len} tokens"
    where = "the GPU has" if device.type == "cuda" else "the host has"

    def numbers(of_bytes: int) -> str:
        return (f"{of_bytes / GB:.1f} GB of {str(chosen).removeprefix('torch.')} weights + {acts / GB:.1f} GB "
                f"for a {batch}; {where} {free / GB:.1f} GB free")

    if offload in ("cpu", "disk") and not (offload == "cpu" and device.type == "cpu"):
        if free is not None and streamed + acts + reserve > free:
            raise LayershapError(f"streamed, this model needs {numbers(streamed)}: pass a smaller --batch-size"
                                 " or --dtype bfloat16")
        return MemoryPlan(chosen, True, offload, f"streaming blocks from {_source(offload)} (--offload "
                          f"{offload})", streamed + acts, free)
    if free is None or whole + acts + reserve <= free:
        return MemoryPlan(chosen, False, "none", None, whole + acts, free)
    if offload == "none" or (offload == "cpu" and device.type == "cpu"):
        if dtype == "auto" and device.type == "cpu" and size(parameters, torch.bfloat16) + acts + reserve <= free:
            return MemoryPlan(torch.bfloat16, False, "none", f"--dtype auto chose bfloat16: {numbers(whole)} "
                              "(float32 does not fit; --offload auto streams it in float32 instead)",
                              size(parameters, torch.bfloat16) + acts, free)
        raise LayershapError(f"the model does not fit: it needs {numbers(whole)}; pass --offload auto to stream "
                             "its blocks, --dtype bfloat16, or a smaller --batch-size")
    if streamed + acts + reserve > free:
        raise LayershapError(f"the model does not fit even streamed: it needs {numbers(streamed)} for its "
                             "embeddings, head and one block; pass --dtype bfloat16 or a smaller --batch-size")
    source = "disk"
    if device.type == "cuda" and host is not None and whole + HOST_RESERVE_BYTES <= host:
        source = "cpu"
    note = (f"the model does not fit whole ({numbers(whole)}): streaming its blocks from {_source(source)}, "
            f"{streamed / GB:.1f} GB resident")
    if dtype == "auto" and device.type == "cpu":
        note += " (--dtype auto kept float32)"
    return MemoryPlan(chosen, True, source, note, streamed + acts, free)


def _source(offload: str) -> str:
    return "host memory" if offload == "cpu" else "the checkpoint on disk"


def env_bytes(name: str) -> int | None:
    """A byte count from the environment (LAYERSHAP_HOST_BYTES, LAYERSHAP_DEVICE_BYTES: pretend the machine
    has this much free, for tests and for leaving room to other processes)."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(float(value))
    except ValueError:
        raise LayershapError(f"{name} must be a number of bytes; got {value!r}") from None
