"""Skip blocks for one evaluation, or remove them for good: both are one edit of the block list.

A skipped block is not run at all (the paper's code zeroes its weights and still runs it), so a masked
forward pass costs in proportion to the blocks kept. Because skipping builds exactly the model that
removal would build (same block list, same renumbered positions, same sliced config), the two agree to the
last bit, which the tests check for every registered architecture.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from layershap.errors import LayershapError
from layershap.models.architectures import Architecture, architecture_of


def block_list(model) -> torch.nn.ModuleList:
    parent, attr = _parent_and_attr(model, architecture_of(model))
    return getattr(parent, attr)


def num_layers(model) -> int:
    """Number of blocks the model runs now."""
    return len(block_list(model))


def kept_indices(mask_or_indices, n: int) -> list[int]:
    """Normalise a boolean keep-mask (length n) or a list of kept indices to sorted indices."""
    arr = np.asarray(mask_or_indices)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise LayershapError(f"a keep-mask needs {n} entries, one per layer; got shape {arr.shape}")
        return [int(i) for i in np.flatnonzero(arr)]
    idx = sorted({int(i) for i in arr.ravel()})
    if idx and (idx[0] < 0 or idx[-1] >= n):
        raise LayershapError(f"layer indices must lie in 0..{n - 1}; got {idx}")
    return idx


def normalise_layer_list(layers: Sequence[int], n: int) -> list[int]:
    """Accept negative indices Python-style (-1 is the last block) and check the range."""
    out = set()
    for i in layers:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise LayershapError(f"layer {i} does not exist: the model has layers 0..{n - 1} (or -1..-{n})")
        out.add(j)
    return sorted(out)


@contextmanager
def keep_only(model, keep) -> Iterator[None]:
    """Run the model with only the kept blocks; everything is restored on exit, also after an exception.

    `keep` is a boolean mask over the current blocks or a list of block indices to keep.
    """
    arch = architecture_of(model)
    check_editable(model, arch)
    parent, attr = _parent_and_attr(model, arch)
    original = getattr(parent, attr)
    kept = kept_indices(keep, len(original))
    if len(kept) == len(original):
        yield
        return
    undo = _apply(model, arch, parent, attr, original, kept)
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


def prune_layers(model, remove: Sequence[int]):
    """Remove the given blocks (original indices, negatives allowed) in place and return the model.

    The config and block positions are rewritten so that `save_pretrained` gives a checkpoint that plain
    transformers loads.
    """
    arch = architecture_of(model)
    check_editable(model, arch)
    parent, attr = _parent_and_attr(model, arch)
    original = getattr(parent, attr)
    n = len(original)
    removed = set(normalise_layer_list(remove, n))
    if len(removed) >= n:
        raise LayershapError(f"cannot remove all {n} layers; remove at most {n - 1}")
    _apply(model, arch, parent, attr, original, [i for i in range(n) if i not in removed])
    return model


def check_editable(model, arch: Architecture | None = None) -> None:
    """Refuse a model whose config lacks the values its family needs for a shorter stack to be exact
    (`Architecture.save_config`; RWKV must not rescale its weights by block position)."""
    arch = arch or architecture_of(model)
    for key, want in arch.save_config.items():
        have = getattr(model.config, key, want)
        if have != want:
            raise LayershapError(
                f"this {arch.name} model has config.{key} = {have!r}, which ties its weights to block "
                f"positions, so its blocks cannot be skipped or removed exactly; load it with "
                f"layershap.load_model (which sets {key} = {want!r}), or set model.config.{key} = {want!r} "
                "before its first forward pass"
            )


def _parent_and_attr(model, arch: Architecture):
    *path, attr = arch.blocks.split(".")
    parent = model
    for name in path:
        parent = getattr(parent, name, None)
        if parent is None:
            raise LayershapError(
                f"could not find the blocks of this {arch.name} model at {arch.blocks!r}; "
                "update its entry in layershap/models/architectures.py"
            )
    if not isinstance(getattr(parent, attr, None), torch.nn.ModuleList):
        raise LayershapError(f"{arch.blocks!r} of this {arch.name} model is not a list of blocks")
    return parent, attr


def _config_count_key(config) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise LayershapError(f"config of type {type(config).__name__} has no layer count")


def _is_settable(config, key: str) -> bool:
    return not isinstance(getattr(type(config), key, None), property)


def _apply(model, arch, parent, attr, original, kept: list[int]) -> list:
    """Install the shortened block list and return the undo steps, newest last."""
    undo = []
    n = len(original)
    setattr(parent, attr, torch.nn.ModuleList([original[i] for i in kept]))
    undo.append(lambda: setattr(parent, attr, original))

    if kept and kept[0] != 0:
        first = original[kept[0]]
        for name in arch.first_block_modules:
            module = original[0]._modules.get(name)
            if module is not None and name not in first._modules:
                setattr(first, name, module)
                undo.append(lambda b=first, k=name: delattr(b, k))

    configs = {id(c): c for c in _configs_of(model)}.values()
    for config in configs:
        key = _config_count_key(config)
        old = getattr(config, key)
        if old != n:
            continue
        setattr(config, key, len(kept))
        undo.append(lambda c=config, k=key, v=old: setattr(c, k, v))
        for list_key in arch.per_layer_config:
            value = getattr(config, list_key, None)
            if isinstance(value, (list, tuple)) and len(value) == n and _is_settable(config, list_key):
                setattr(config, list_key, type(value)(value[i] for i in kept))
                undo.append(lambda c=config, k=list_key, v=value: setattr(c, k, v))
        for bound_key in arch.boundary_config:
            value = getattr(config, bound_key, None)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
                setattr(config, bound_key, sum(1 for i in kept if i < value))
                undo.append(lambda c=config, k=bound_key, v=value: setattr(c, k, v))

    for new_pos, old_pos in enumerate(kept):
        for module in _walk(original[old_pos]):
            for name in arch.index_attrs:
                value = vars(module).get(name)  # plain attributes only: nn.Module's __getattr__ is slow to miss
                if isinstance(value, int) and not isinstance(value, bool) and value != new_pos:
                    setattr(module, name, new_pos)
                    undo.append(lambda m=module, k=name, v=value: setattr(m, k, v))
    return undo


def _configs_of(model) -> list:
    """The config objects that may describe the block stack: the top one and any nested one that a
    submodule holds (only those whose layer count equals the stack's length are edited)."""
    configs = [model.config]
    for module in _walk(model):
        config = vars(module).get("config")
        if config is not None and hasattr(config, "to_dict") and all(config is not c for c in configs):
            configs.append(config)
    return configs


def _walk(root: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every submodule, root first: `Module.modules()` without its name strings and memo, which made
    `keep_only` cost ~1 ms per call on a 32-block model (3% of a 7B model's masked pass on an H200). A module
    shared by two parents is visited twice, which both callers tolerate."""
    stack = [root]
    while stack:
        module = stack.pop()
        yield module
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)
