"""What a stored evaluation is keyed by: which model measured it, and under which conditions.

A stored NLL may be reused only for the same model (`model_fingerprint`) measured the same way
(`measurement_context`); both are short hex digests so they can key rows of the evaluation store.

The context is everything besides the weights and the mask that can change an NLL's bits
(`context_description`): the calibration tokens, the loss ("mean_nll", or "mean_kl_top64" for `--utility kl`,
so NLL and KL rows never mix; an NLL context is described exactly as before the KL loss existed), the dtype, the device (type, and the GPU's name,
since kernels differ between GPU generations), the attention implementation, the batch size, and the torch
and transformers versions. The batch size is always part of it: in bfloat16 and float16 on a GPU it changes
which kernels run and so the values, and even in float32 on a CPU the loss is summed batch by batch, so a
different grouping may change the last bits; a reused number must be the number this run would measure.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import torch

from layershap.data.windows import tokens_fingerprint

if TYPE_CHECKING:
    from layershap.game.layer_game import LayerGame

# Bytes hashed per update: large enough that hashlib runs at its streaming speed, small enough that a GPU
# tensor is copied to the host a slice at a time.
_HASH_CHUNK_BYTES = 64 << 20


def _config_digest(model):
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest


def _raw_bytes(tensor: torch.Tensor) -> list[torch.Tensor]:
    """A tensor's bytes as flat uint8 tensors; a tensor subclass (torchao's quantized weights) by its inner
    tensors (the stored integers and scales), else by its dequantized values."""
    try:
        return [tensor.detach().reshape(-1).contiguous().view(torch.uint8)]
    except (RuntimeError, TypeError, NotImplementedError):
        pass
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        inner = [getattr(tensor, name) for name in names]
        if all(isinstance(t, torch.Tensor) for t in inner):
            return [raw for t in inner for raw in _raw_bytes(t)]
    values = tensor.dequantize() if hasattr(tensor, "dequantize") else tensor
    return [values.detach().to("cpu", torch.float32).reshape(-1).contiguous().view(torch.uint8)]


def _tensor_bytes(tensor: torch.Tensor):
    """The tensor's raw bytes as host memoryviews, a chunk at a time (no copy for a contiguous CPU tensor)."""
    for raw in _raw_bytes(tensor):
        for start in range(0, raw.numel(), _HASH_CHUNK_BYTES):
            chunk = raw[start:start + _HASH_CHUNK_BYTES]
            if chunk.device.type != "cpu":
                chunk = chunk.cpu()
            yield memoryview(chunk.numpy())


def model_fingerprint(model) -> str:
    """Identifies the config and every byte of every weight (a fine-tune that touched one row changes it).

    Each tensor contributes its name, shape, dtype and all of its bytes (BLAKE2b, which hashes about
    1 GB/s per core: docs/benchmarks.md measures it); a tensor shared under two names (tied embeddings) is
    hashed once and named as the same storage the second time.
    """
    from layershap.models.stream import streamer_of

    digest = _config_digest(model)
    body = hashlib.blake2b(digest_size=32)
    seen: dict[tuple, str] = {}
    streamer = streamer_of(model)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            source = streamer.source_of(tensor) if streamer is not None else None
            if source is not None:  # a streamed block's weight: hashed from the checkpoint, as loaded
                tensor = streamer.read(source)
            tensor = tensor.detach()
            body.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            key = (tensor.device.type, tensor.data_ptr(), tensor.numel(), tensor.dtype, tuple(tensor.stride()))
            if source is not None:  # read afresh, freed after hashing: its address says nothing of sharing
                key = ("checkpoint", source)
            if tensor.numel() and key in seen:
                body.update(f"=same as {seen[key]}".encode())
                continue
            seen[key] = name
            for chunk in _tensor_bytes(tensor):
                body.update(chunk)
    digest.update(b"full-content-v2")
    digest.update(body.digest())
    return digest.hexdigest()[:16]


def legacy_model_fingerprint(model) -> str:
    """The fingerprint of layershap before the full-content one (a strided sample of each tensor): only to
    recognise a store written then as this model's (`game/store.py` upgrades it)."""
    from layershap.models.stream import streamer_of

    digest = _config_digest(model)
    streamer = streamer_of(model)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            source = streamer.source_of(tensor) if streamer is not None else None
            flat = (streamer.read(source) if source is not None else tensor).detach().reshape(-1)
            step = max(1, flat.numel() // 65536)
            sample = flat[::step].to("cpu", torch.float64).numpy()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def device_label(device: torch.device) -> str:
    """The device type, with the GPU's name where there is one (kernels, and so low bits, differ by GPU)."""
    if device.type == "cuda":
        try:
            return f"cuda:{torch.cuda.get_device_name(device)}"
        except Exception:  # noqa: BLE001 - no driver to ask: the type alone
            return "cuda"
    return device.type


def context_description(game: LayerGame) -> dict[str, str]:
    """Every condition besides the weights and the mask that a stored NLL depends on, by name."""
    import transformers

    weight = next(game.model.parameters())
    return {
        "tokens": tokens_fingerprint(game.tokens),
        "loss": str(getattr(game, "loss_name", "mean_nll")),
        "players": str(getattr(game, "granularity", "block")),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "device": device_label(weight.device),
        "attention": str(getattr(game.model.config, "_attn_implementation", None) or "default"),
        "batch_size": str(game.batch_size),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def context_key(description: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def measurement_context(game: LayerGame) -> str:
    """The short key of `context_description`: stored rows are reused only under the same key."""
    return context_key(context_description(game))


def context_differences(ours: dict[str, str], theirs: dict[str, str] | None) -> list[str]:
    """Names of the conditions that differ (["layershap version"] for a row stored without a description)."""
    if theirs is None:
        return ["layershap version"]
    return [key for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
