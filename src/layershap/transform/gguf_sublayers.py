"""Write a sublayer plan as a GGUF in llama.cpp's `deci` architecture (the Nemotron-NAS block layout), the kept
tensors copied byte for byte in their original quantization types.

llama.cpp's `deci` reads per-layer head counts and FFN widths (`deci.attention.head_count`,
`deci.attention.head_count_kv`, `deci.feed_forward_length`, one entry per block) and builds each block from
them (src/models/deci.cpp). Read against what a pruned block must compute, `x + attn(x)` then `+ mlp(.)`:

- `n_head == 0`: the attention is skipped and the block's input goes straight to its FFN, whose residual add
  is `ffn(x) + x`. Faithful for a block that drops its attention, so such blocks are written natively: FFN
  tensors only, no attention tensors, and no KV cache (llama.cpp sizes a layer's cache by `n_head_kv`).
- `n_ff == 0`: the graph `continue`s before the residual add and before the block output is passed on, so a
  block that keeps its attention would lose the attention's output: the block becomes the identity. Not
  faithful, so it is never written. A block that keeps only its attention gets an FFN of width 1 whose
  weights are all zero (`ffn_norm` ones; `ffn_gate`, `ffn_up` [n_embd x 1] and `ffn_down` [1 x n_embd] zeros,
  F32): it adds exactly 0, at 3 n_embd + n_embd floats per block and a negligible matmul.
- llama.cpp derives the head size from the first block's head count (`n_embd / n_head(0)`; a zero there
  leaves every block without a head size). So when the first kept block drops its attention, it is written as
  Nemotron-51B's "linear attention" (`n_head > 0`, `n_head_kv == 0`: output `wo(norm(x))`, no KV cache) with
  `wo` all zero (F16, n_embd^2) and a norm of ones: it adds exactly 0, at n_embd^2 half floats and one
  n_embd^2 matmul per token.
- a block with both sublayers dropped is left out, and the blocks after it are renumbered.

Only llama.cpp's `llama` architecture (Llama, Mistral) is written this way: `deci` shares its tensor names,
its RoPE layout (llama.cpp's "normal" rope, for which the Q/K weights were permuted on conversion) and its
RMS norms, so each kept tensor means the same in the new file. Every `llama.*` key is carried as `deci.*`,
the tokenizer and other keys unchanged, and `layershap.*` keys record the plan and the placeholders.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from layershap.errors import LayershapError
from layershap.transform.gguf_export import (
    TAGS,
    _block_count,
    _field_value,
    _first_line,
    _string,
    provenance_keys,
    write_atomically,
)

ARCH = "deci"
SOURCE_ARCHITECTURES = ("llama",)
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")
# Per-block tensors of a llama block, by sublayer (deci loads the same names; biases are optional there too).
_ATTENTION = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
              "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"}
_FFN = {"ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
        "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"}
_PER_LAYER = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")


def check_sublayer_gguf_exportable(path) -> str:
    """Refuse, in one line, a GGUF whose sublayer plans cannot be written as `deci`; return its architecture."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(Path(path).expanduser()))
    except (OSError, ValueError) as exc:
        raise LayershapError(f"cannot read {path} as a GGUF file ({_first_line(exc)})") from None
    return _check_source(reader, Path(path).name)


def _check_source(reader, name: str) -> str:
    arch = _string(reader, "general.architecture")
    if arch not in SOURCE_ARCHITECTURES:
        raise LayershapError(f"a sublayer plan is written as llama.cpp's deci architecture, which holds the "
                             f"blocks of {', '.join(SOURCE_ARCHITECTURES)} GGUFs only; {name} is {arch!r}. Use "
                             "--granularity block for a GGUF, or an --out directory")
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.match(tensor.name)
        if match and match.group(2) not in _ATTENTION | _FFN:
            raise LayershapError(f"{name} holds {tensor.name}, which llama.cpp's deci blocks do not load (an "
                                 "expert FFN or a tensor of another layout); use --granularity block for it")
    return arch


def _per_layer(reader, key: str, n: int, default=None) -> list[int]:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise LayershapError(f"the GGUF has no {key} key; not a file layershap can write as deci")
        return list(default)
    value, _, _ = _field_value(field)
    values = list(value) if isinstance(value, list) else [value] * n
    if len(values) != n:
        raise LayershapError(f"{key} has {len(values)} entries for {n} blocks")
    return [int(v) for v in values]


def _kept_parts(removed: Sequence[str], n: int) -> list[tuple[bool, bool]]:
    from layershap.models.sublayers import parse_sublayer

    keep = np.ones(2 * n, dtype=bool)
    for name in removed:
        keep[parse_sublayer(str(name), n)] = False
    return [(bool(keep[2 * i]), bool(keep[2 * i + 1])) for i in range(n)]


def whole_blocks(removed: Sequence[str], n: int) -> list[int] | None:
    """The blocks a sublayer plan removes when it removes only whole blocks (both sublayers of each), else
    None: such a plan is written in the input's own architecture, which more engines run."""
    parts = _kept_parts(removed, n)
    if any(attn != mlp for attn, mlp in parts):
        return None
    return [i for i, (attn, _) in enumerate(parts) if not attn]


def write_sublayer_gguf(source, out, removed_sublayers: Sequence[str], record: dict | None = None) -> dict:
    """Write `out`: the llama GGUF `source` as a `deci` GGUF without the sublayers `removed_sublayers`
    (`attn.i`, `mlp.i`, original block indices). Returns what was written: kept blocks, per-block layout,
    tensors copied, placeholders and their bytes, notes."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    source, out = Path(source).expanduser(), Path(out).expanduser()
    try:
        reader = GGUFReader(str(source))
    except (OSError, ValueError) as exc:
        raise LayershapError(f"cannot read {source} as a GGUF file ({_first_line(exc)})") from None
    if out.resolve() == source.resolve():
        raise LayershapError(f"--out {out} is the input file; give another path")
    src_arch = _check_source(reader, source.name)
    n = _block_count(reader, src_arch)
    parts = _kept_parts(removed_sublayers, n)
    kept = [i for i in range(n) if any(parts[i])]
    if not kept:
        raise LayershapError(f"cannot remove every sublayer of {source.name}")
    n_embd = int(_field_value(reader.fields[f"{src_arch}.embedding_length"])[0])
    heads = _per_layer(reader, f"{src_arch}.attention.head_count", n)
    heads_kv = _per_layer(reader, f"{src_arch}.attention.head_count_kv", n, default=heads)
    widths = _per_layer(reader, f"{src_arch}.feed_forward_length", n)

    layout = {"attention.head_count": [], "attention.head_count_kv": [], "feed_forward_length": []}
    zero_ffn, zero_attention = [], []
    for new, old in enumerate(kept):
        attn, mlp = parts[old]
        if attn:
            head, head_kv = heads[old], heads_kv[old]
        elif new == 0:  # the head size comes from block 0's head count: a zero "linear attention" instead
            head, head_kv = heads[old], 0
            zero_attention.append(new)
        else:
            head, head_kv = 0, 0
        if not mlp:
            zero_ffn.append(new)
        layout["attention.head_count"].append(head)
        layout["attention.head_count_kv"].append(head_kv)
        layout["feed_forward_length"].append(widths[old] if mlp else 1)

    writer = GGUFWriter(None, ARCH)
    writer.data_alignment = reader.alignment
    own = {f"{src_arch}.block_count", *(f"{src_arch}.{key}" for key in _PER_LAYER)}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in own:
            continue
        value, vtype, sub_type = _field_value(field)
        if key.startswith(f"{src_arch}."):
            key = f"{ARCH}.{key.removeprefix(f'{src_arch}.')}"
            if vtype == GGUFValueType.ARRAY and len(value) == n:
                raise LayershapError(f"{source.name} has the per-block key {key}, which layershap does not know "
                                     "how to carry into a deci file; use --granularity block")
        elif key == "general.tags" and sub_type == GGUFValueType.STRING:
            value = list(value) + [tag.encode() for tag in TAGS if tag.encode() not in value]
        if vtype == GGUFValueType.ARRAY and not value:
            continue
        writer.add_key_value(key, value, vtype, sub_type)
    if "general.tags" not in reader.fields:
        writer.add_array("general.tags", list(TAGS))
    writer.add_key_value(f"{ARCH}.block_count", len(kept), GGUFValueType.UINT32)
    for key, values in layout.items():
        writer.add_key_value(f"{ARCH}.{key}", values, GGUFValueType.ARRAY, GGUFValueType.UINT32)
    whole = [i for i in range(n) if not any(parts[i])]
    for key, value, vtype in provenance_keys(record or {}, source=source, n_blocks=n, removed=whole):
        writer.add_key_value(key, value, vtype, GGUFValueType.INT32 if vtype == GGUFValueType.ARRAY else None)
    writer.add_key_value("layershap.granularity", "sublayer", GGUFValueType.STRING)
    if removed_sublayers:
        writer.add_key_value("layershap.removed_sublayers", [str(s) for s in removed_sublayers],
                             GGUFValueType.ARRAY, GGUFValueType.STRING)
    for key, blocks in (("layershap.zero_ffn_blocks", zero_ffn), ("layershap.zero_attention_blocks",
                                                                  zero_attention)):
        if blocks:
            writer.add_key_value(key, blocks, GGUFValueType.ARRAY, GGUFValueType.INT32)

    copied, added_bytes = 0, 0
    by_block: dict[int, list] = {}
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.match(tensor.name)
        if not match:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
            copied += 1
            continue
        by_block.setdefault(int(match.group(1)), []).append((match.group(2), tensor))
    for new, old in enumerate(kept):
        attn, mlp = parts[old]
        for part, tensor in by_block.get(old, []):
            if (part in _ATTENTION and attn) or (part in _FFN and mlp):
                writer.add_tensor(f"blk.{new}.{part}", tensor.data, raw_shape=tensor.data.shape,
                                  raw_dtype=tensor.tensor_type)
                copied += 1
        placeholders = []
        if new in zero_attention:
            placeholders += [("attn_norm.weight", np.ones(n_embd, np.float32)),
                             ("attn_output.weight", np.zeros((n_embd, n_embd), np.float16))]
        if new in zero_ffn:
            placeholders += [("ffn_norm.weight", np.ones(n_embd, np.float32)),
                             ("ffn_gate.weight", np.zeros((1, n_embd), np.float32)),
                             ("ffn_up.weight", np.zeros((1, n_embd), np.float32)),
                             ("ffn_down.weight", np.zeros((n_embd, 1), np.float32))]
        for part, array in placeholders:
            dtype = GGMLQuantizationType.F16 if array.dtype == np.float16 else GGMLQuantizationType.F32
            writer.add_tensor(f"blk.{new}.{part}", array, raw_dtype=dtype)
            added_bytes += array.nbytes

    write_atomically(writer, out)
    notes = []
    if zero_ffn:
        notes.append(f"{len(zero_ffn)} block(s) keep only their attention: llama.cpp's deci drops a block's "
                     "output when its FFN width is 0, so each carries a zero FFN of width 1 "
                     f"({16 * n_embd} bytes) that adds exactly 0")
    if zero_attention:
        notes.append("the first block drops its attention: llama.cpp takes the head size from block 0, so it "
                     f"carries a zero output projection ({2 * n_embd * n_embd} bytes, no KV cache) that adds "
                     "exactly 0")
    return {"file": str(out), "architecture": ARCH, "source_architecture": src_arch, "source": str(source),
            "source_blocks": n, "kept": kept, "removed": whole, "removed_sublayers": list(removed_sublayers),
            "layout": layout, "zero_ffn_blocks": zero_ffn, "zero_attention_blocks": zero_attention,
            "placeholder_bytes": added_bytes, "tensors": copied, "bytes": out.stat().st_size, "notes": notes}
