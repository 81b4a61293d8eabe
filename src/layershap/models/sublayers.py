"""Attention and MLP sublayers as players: skip single residual branches of a block, exactly.

A sublayer keep-mask has 2n entries, `attn.0, mlp.0, attn.1, mlp.1, ...`. A block whose two sublayers are
both dropped is dropped as a whole (`layers.keep_only`: it does not run, and the blocks after it are
renumbered). In a block that keeps one of its two sublayers, the dropped branch's submodules (where they live
is in the family's registry entry, `Architecture.attention` and `.mlp`) are swapped for modules that run
nothing: its norms become identities, and the branch itself returns a zero scalar, so `h + branch(h)` is `h`
to the last bit. A dropped attention does not touch the KV cache: the config gains `kv_sharing_modes` with
"reuse" at its block, which transformers' caches turn into a `DummyLayer` that stores nothing and that
`get_seq_length` and the mask builders look past. Everything is restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from layershap.errors import LayershapError
from layershap.models.architectures import Architecture, architecture_of
from layershap.models.layers import (
    _apply,
    _config_count_key,
    _configs_of,
    _parent_and_attr,
    check_editable,
    keep_only,
)

KINDS = ("attn", "mlp")
KV_CACHE_KEY = "kv_sharing_modes"  # transformers' per-layer switch: "reuse" gives a layer a cache that holds nothing
REMOVED_KEY = "layershap_removed_sublayers"  # a saved model's config: the sublayers replaced by identities


class SkippedBranch(torch.nn.Module):
    """Stands in for a dropped residual branch: runs nothing, returns a zero scalar (and no attention weights
    where the branch is an attention), which the block's residual sum broadcasts away."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        zero = x.new_zeros(())
        return (zero, None) if self.returns_tuple else zero


def sublayer_names(n: int) -> list[str]:
    return [f"{kind}.{i}" for i in range(n) for kind in KINDS]


def parse_sublayer(name: str, n: int) -> int:
    """`attn.3` or `mlp.3` -> its index among the 2n players."""
    kind, _, index = name.partition(".")
    if kind not in KINDS or not index.isdigit() or not 0 <= int(index) < n:
        raise LayershapError(f"{name!r} is not a sublayer of this model: use attn.i or mlp.i with i in 0..{n - 1}")
    return 2 * int(index) + KINDS.index(kind)


def check_sublayers(model, arch: Architecture | None = None) -> Architecture:
    """Refuse, in one line, a model whose sublayers cannot be skipped by passing the residual stream through."""
    arch = arch or architecture_of(model)
    if arch.kind != "transformer":
        raise LayershapError(f"{arch.name} is a recurrent model: its blocks have no attention and MLP sublayers to "
                             "skip; use --granularity block")
    if arch.attention is None or arch.mlp is None:
        raise LayershapError(f"the sublayers of {arch.name} blocks are not described in the registry "
                             "(layershap/models/architectures.py); use --granularity block")
    for key, want in arch.sublayer_config.items():
        have = getattr(model.config, key, want)
        if have != want:
            raise LayershapError(f"this {arch.name} model has config.{key} = {have!r} (a norm after each residual "
                                 "sum), so a sublayer cannot be skipped by passing the stream through; use "
                                 "--granularity block")
    return arch


def is_sublayer_mask(mask, n: int) -> bool:
    arr = np.asarray(mask)
    return arr.dtype == bool and arr.shape == (2 * n,)


def block_mask(mask) -> np.ndarray:
    """Blocks that keep at least one sublayer."""
    return np.asarray(mask, dtype=bool).reshape(-1, 2).any(axis=1)


def keep(model, mask):
    """`keep_sublayers` for a 2n-entry boolean mask, else `layers.keep_only` (block masks, kept indices). A
    sublayer mask that keeps or drops each block whole (the empty one too) is run as its block mask."""
    n = len(_blocks(model))
    if not is_sublayer_mask(mask, n):
        return keep_only(model, mask)
    pairs = np.asarray(mask, dtype=bool).reshape(n, 2)
    if (pairs[:, 0] == pairs[:, 1]).all():
        return keep_only(model, pairs[:, 0].copy())
    return keep_sublayers(model, mask)


class keep_sublayers:  # a context manager, named like keep_only
    """Run the model with only the kept sublayers (a boolean mask of 2n entries); restored on exit."""

    def __init__(self, model, mask):
        self.model, self.mask = model, np.asarray(mask, dtype=bool)

    def __enter__(self):
        self.undo = skip_sublayers(self.model, self.mask)
        return self

    def __exit__(self, *exc):
        for fn in reversed(self.undo):
            fn()


def skip_sublayers(model, mask) -> list:
    """Apply a 2n sublayer mask in place; returns the undo steps, newest last."""
    arch = architecture_of(model)
    check_editable(model, arch)
    check_sublayers(model, arch)
    parent, attr = _parent_and_attr(model, arch)
    original = getattr(parent, attr)
    n = len(original)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (2 * n,):
        raise LayershapError(f"a sublayer keep-mask needs {2 * n} entries (attn.i, mlp.i per block); got {mask.shape}")
    pairs = mask.reshape(n, 2)
    kept = [i for i in range(n) if pairs[i].any()]
    if not kept:
        raise LayershapError("a sublayer mask must keep at least one sublayer")
    undo = _apply(model, arch, parent, attr, original, kept) if len(kept) < n else []
    try:
        no_attention = []
        for new_pos, old_pos in enumerate(kept):
            block = original[old_pos]
            for kind, layout in zip(KINDS, (arch.attention, arch.mlp)):
                if not pairs[old_pos, KINDS.index(kind)]:
                    undo.extend(_replace_branch(block, layout))
                    if kind == "attn":
                        no_attention.append(new_pos)
        if no_attention:
            undo.extend(_set_kv_modes(model, len(kept), no_attention))
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    return undo


def remove_sublayers(model, mask):
    """Remove the dropped sublayers for good: whole blocks leave the block list (`_apply`), single branches are
    replaced by identities, and the config records them (`REMOVED_KEY`, by new block positions) for the saved
    model's own modeling file. Returns the model."""
    skip_sublayers(model, mask)
    pairs = np.asarray(mask, dtype=bool).reshape(-1, 2)
    kept = [i for i in range(len(pairs)) if pairs[i].any()]
    removed = [f"{kind}.{new}" for new, old in enumerate(kept) for j, kind in enumerate(KINDS) if not pairs[old, j]]
    model.config.update({REMOVED_KEY: removed})
    return model


def _replace_branch(block: torch.nn.Module, layout) -> list:
    undo = []
    for name in layout.names:
        module = block._modules.get(name)
        if module is None:
            continue
        replacement = SkippedBranch(layout.returns_tuple) if name == layout.module else torch.nn.Identity()
        block._modules[name] = replacement
        undo.append(lambda b=block, k=name, m=module: b._modules.__setitem__(k, m))
    missing = [name for name in (layout.module,) if name not in block._modules]
    if missing:
        raise LayershapError(f"{type(block).__name__} has no submodule {missing[0]!r}; update its entry in "
                             "layershap/models/architectures.py")
    return undo


def _set_kv_modes(model, n_kept: int, no_attention: list[int]) -> list:
    undo = []
    modes = ["reuse" if i in no_attention else "own" for i in range(n_kept)]
    for config in {id(c): c for c in _configs_of(model)}.values():
        if getattr(config, _config_count_key(config), None) != n_kept:
            continue
        old = getattr(config, KV_CACHE_KEY, None)
        had = KV_CACHE_KEY in vars(config)
        setattr(config, KV_CACHE_KEY, modes)
        undo.append(lambda c=config, v=old, h=had: setattr(c, KV_CACHE_KEY, v) if h else delattr(c, KV_CACHE_KEY))
    return undo


def sublayer_parameters(model) -> np.ndarray:
    """Parameters of each of the 2n sublayers (a branch's own norms included; a shared norm counts for neither)."""
    arch = check_sublayers(model)
    out = []
    for block in _blocks(model):
        for layout in (arch.attention, arch.mlp):
            seen = set()
            total = 0
            for name in layout.names:
                module = block._modules.get(name)
                if module is None:
                    continue
                for p in module.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel()
            out.append(total)
    return np.array(out, dtype=np.int64)


def block_parameters(model) -> int:
    """Parameters of all decoder blocks together (the denominator of a parameter ratio)."""
    return sum(p.numel() for p in _blocks(model).parameters())


def kv_cache_fraction_removed(mask) -> float:
    """Share of the KV cache a sublayer plan saves: every attention caches the same bytes per token."""
    attn = np.asarray(mask, dtype=bool).reshape(-1, 2)[:, 0]
    return float((~attn).sum() / len(attn))


def _blocks(model) -> torch.nn.ModuleList:
    parent, attr = _parent_and_attr(model, architecture_of(model))
    return getattr(parent, attr)


def sublayer_iter(mask) -> Iterator[str]:
    """Names of the dropped sublayers of a 2n mask."""
    mask = np.asarray(mask, dtype=bool)
    names = sublayer_names(len(mask) // 2)
    return (names[i] for i in np.flatnonzero(~mask))
