"""Write a pruned GGUF: the kept blocks of a GGUF file, byte for byte, in their original quantization types.

The blocks are chosen on the dequantized model (transformers reads the GGUF into float); this module then
works on the file itself with the `gguf` library and never requantizes anything:

- tensors `blk.<i>.*` of kept blocks are copied unchanged (same type, shape and bytes) and renumbered
  `blk.0 ...` in their order; tensors outside the blocks (embeddings, output norm, head) are copied as they are;
- `<arch>.block_count` becomes the number of kept blocks, and every per-layer metadata array (one entry per
  block: per-layer head counts, feed-forward sizes, sliding-window patterns) is sliced to the kept blocks;
- for architectures whose sliding-window layers llama.cpp derives from the block position (Gemma 2 and 3),
  the pattern of the kept blocks is written as a per-layer array, which llama.cpp reads in place of the period;
- the tokenizer and every other key are carried over; `general.tags` gains `pruned` and `layershap`; keys
  under `layershap.` record what was done (base model, removed blocks, method, forward passes, perplexities).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from layershap.errors import LayershapError
from layershap.models.architectures import ARCHITECTURES
from layershap.models.layers import normalise_layer_list

# llama.cpp's architecture name -> the transformers model type that reading such a GGUF produces.
_MODEL_TYPE = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}
# Architectures whose sliding-window layers llama.cpp places by block position: period, and whether the key
# `<arch>.attention.sliding_window` must be present and positive for there to be any (Gemma 3).
_POSITIONAL_SWA = {"gemma2": (2, False), "gemma3": (6, True)}
# Arrays under `<arch>.` that do not have one entry per block even when their length happens to match.
_NOT_PER_LAYER = ("rope.dimension_sections",)
# Block counts from which llama.cpp infers a model size that changes the arithmetic, not only its label: Gemma 2
# and 3 at 27B scale attention by 1/sqrt(embedding / heads) instead of 1/sqrt(head size), with no key to say so.
_SIZE_BY_BLOCK_COUNT = {("gemma2", 46): "Gemma 2 27B", ("gemma3", 62): "Gemma 3 27B"}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")
TAGS = ("pruned", "layershap")


def is_gguf_path(path) -> bool:
    return str(path).lower().endswith(".gguf")


def gguf_architecture(path) -> str:
    """`general.architecture` of a GGUF file (llama.cpp's name, e.g. llama, qwen2, gemma3)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise LayershapError(f"cannot read {path} as a GGUF file ({_first_line(exc)})") from None
    return _string(reader, "general.architecture")


def exportable_architectures() -> list[str]:
    """llama.cpp architectures that transformers reads from GGUF and whose family layershap registers."""
    from gguf import MODEL_ARCH_NAMES
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(arch for arch in set(MODEL_ARCH_NAMES.values())
                  if (arch in GGUF_SUPPORTED_ARCHITECTURES or _MODEL_TYPE.get(arch) in GGUF_SUPPORTED_ARCHITECTURES)
                  and _MODEL_TYPE.get(arch, arch) in ARCHITECTURES)


def check_gguf_exportable(path) -> str:
    """Refuse, in one line, a GGUF that layershap cannot prune and write back; return its architecture."""
    return _open_exportable(path)[1]


def _open_exportable(path):
    from gguf import GGUFReader

    path = Path(path).expanduser()
    if not is_gguf_path(path):
        raise LayershapError(f"a GGUF output needs a GGUF model to copy the kept blocks from; got --model "
                             f"{path}. Give --model FILE.gguf, or an --out directory for a Hugging Face checkpoint")
    if not path.is_file():
        raise LayershapError(f"model file {path} does not exist; give an existing .gguf file")
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise LayershapError(f"cannot read {path} as a GGUF file ({_first_line(exc)})") from None
    split = reader.fields.get("split.count")
    if split is not None and int(split.parts[split.data[0]][0]) > 1:
        raise LayershapError(f"{path.name} is one part of a split GGUF; merge it first (llama-gguf-split --merge) "
                             "and give the merged file")
    arch = _string(reader, "general.architecture")
    supported = exportable_architectures()
    if arch not in supported:
        raise LayershapError(f"cannot prune GGUF architecture {arch!r} into a GGUF (transformers must read it and "
                             f"layershap must know its blocks); supported: {', '.join(supported)}")
    return reader, arch


def write_pruned_gguf(source, out, removed: Sequence[int], record: dict | None = None, *,
                      edit_tensor=None) -> dict:
    """Write `out`: the GGUF `source` without the blocks `removed` (original indices). `record` (what prune
    wrote to layershap.json) supplies the provenance keys. `edit_tensor(name, data, type)` may return
    `(data, type)` to write in place of a kept tensor's own bytes (a repair, `gguf_repair.py`), under its new
    name. Returns what was written: kept blocks, tensors copied, metadata arrays sliced, and notes for the
    user."""
    from gguf import GGUFValueType, GGUFWriter

    source, out = Path(source).expanduser(), Path(out).expanduser()
    reader, arch = _open_exportable(source)
    if out.resolve() == source.resolve():
        raise LayershapError(f"--out {out} is the input file; give another path")
    n = _block_count(reader, arch)
    removed_set = set(normalise_layer_list(removed, n))
    kept = [i for i in range(n) if i not in removed_set]
    if not kept:
        raise LayershapError(f"cannot remove all {n} blocks of {source.name}")
    position = {old: new for new, old in enumerate(kept)}

    writer = GGUFWriter(None, arch)
    writer.data_alignment = reader.alignment
    notes: list[str] = []
    sliced: list[str] = []
    swa_key = f"{arch}.attention.sliding_window_pattern"
    swa = _positional_swa_pattern(reader, arch, n, kept)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or (key == swa_key and swa is not None):
            continue  # the header, the key the writer adds itself, a period replaced by a per-layer pattern
        value, vtype, sub_type = _field_value(field)
        if key == f"{arch}.block_count":
            value = len(kept)
        elif (vtype == GGUFValueType.ARRAY and key.startswith(f"{arch}.") and len(value) == n
              and key.removeprefix(f"{arch}.") not in _NOT_PER_LAYER):
            value = [value[i] for i in kept]
            sliced.append(key)
        elif key == "general.tags" and sub_type == GGUFValueType.STRING:
            value = list(value) + [tag.encode() for tag in TAGS if tag.encode() not in value]
        if vtype == GGUFValueType.ARRAY and not value:
            notes.append(f"left out the empty array {key} (the gguf library cannot write one)")
            continue
        writer.add_key_value(key, value, vtype, sub_type)
    if "general.tags" not in reader.fields:
        writer.add_array("general.tags", list(TAGS))
    if swa is not None:
        writer.add_key_value(swa_key, swa, GGUFValueType.ARRAY, GGUFValueType.BOOL)
        sliced.append(swa_key)
        notes.append(f"wrote {swa_key} per block (llama.cpp reads it); transformers "
                     "places sliding-window layers by position instead, so it reads this file's pattern "
                     "differently from the model the blocks were chosen on")
    if (arch, n) in _SIZE_BY_BLOCK_COUNT and len(kept) != n:
        notes.append(f"llama.cpp recognises {_SIZE_BY_BLOCK_COUNT[arch, n]} by its {n} blocks and then scales "
                     f"attention differently; with {len(kept)} blocks it will not, so llama.cpp runs this file "
                     "with another attention scale than the original's")
    for key, value, vtype in provenance_keys(record or {}, source=source, n_blocks=n, removed=sorted(removed_set)):
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, GGUFValueType.INT32)
        else:
            writer.add_key_value(key, value, vtype)

    copied = 0
    for tensor in reader.tensors:
        name = tensor.name
        match = _BLOCK_TENSOR.match(name)
        if match:
            block = int(match.group(1))
            if block >= n:
                raise LayershapError(f"{source.name} holds tensor {name} beyond its {n} blocks; not a file "
                                     "layershap can prune")
            if block in removed_set:
                continue
            name = f"blk.{position[block]}.{match.group(2)}"
        data, qtype = tensor.data, tensor.tensor_type
        replaced = edit_tensor(name, data, qtype) if edit_tensor is not None else None
        if replaced is not None:
            data, qtype = replaced
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        copied += 1

    write_atomically(writer, out)
    return {"file": str(out), "architecture": arch, "source": str(source), "source_blocks": n,
            "kept": kept, "removed": sorted(removed_set), "tensors": copied, "sliced_metadata": sliced,
            "bytes": out.stat().st_size, "notes": notes}


def write_atomically(writer, out: Path) -> None:
    """Write a filled `GGUFWriter` to `out` through a temporary file beside it, so that an interrupted write
    never leaves a truncated GGUF under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def provenance_keys(record: dict, *, source: Path, n_blocks: int, removed: list[int]) -> list[tuple]:
    """(key, value, GGUFValueType) for the `layershap.*` metadata: what a pruned file records about itself,
    the same facts as the model card of a Hugging Face directory."""
    from gguf import GGUFValueType as T

    from layershap import __version__

    keys = [("layershap.version", __version__, T.STRING),
            ("layershap.base_model", source.name, T.STRING),
            ("layershap.base_block_count", n_blocks, T.UINT32),
            ("layershap.kept_blocks", [i for i in range(n_blocks) if i not in set(removed)], T.ARRAY)]
    if removed:  # the gguf library writes no empty array
        keys.append(("layershap.removed_blocks", list(removed), T.ARRAY))
    if record.get("method"):
        keys.append(("layershap.method", str(record["method"]), T.STRING))
    if record.get("ratio") is not None:
        keys.append(("layershap.ratio", float(record["ratio"]), T.FLOAT64))
    if record.get("forward_passes") is not None:
        keys.append(("layershap.forward_passes", int(record["forward_passes"]), T.UINT64))
    if record.get("plan_file"):
        keys.append(("layershap.plan_file", Path(record["plan_file"]).name, T.STRING))
    for when in ("before", "after"):
        for name, value in (record.get(f"ppl_{when}") or {}).items():
            keys.append((f"layershap.ppl_{when}.{_key_part(name)}", float(value), T.FLOAT64))
    for name, windows in (record.get("evaluation") or {}).items():
        if isinstance(windows, dict) and windows.get("samples") and windows.get("seq_len"):
            keys.append((f"layershap.evaluation.{_key_part(name)}",
                         (f"{name}: {windows['samples']} windows x {windows['seq_len']} tokens, "
                          f"{windows.get('split', 'evaluation')} half"), T.STRING))
    return keys


def _key_part(name: str) -> str:
    """A text's name as one part of a dotted key: `wiki` stays, a file path becomes its file name with any
    character other than letters, digits, - and _ replaced by _."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(str(name)).name) or "text"


def _field_value(field):
    """A reader field as (value, type, sub_type) for `GGUFWriter.add_key_value`; strings stay bytes so that
    they are copied exactly as stored."""
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise LayershapError(f"GGUF key {field.name} is an array of arrays, which layershap cannot copy")
        if sub == GGUFValueType.STRING:
            return [field.parts[i].tobytes() for i in field.data], main, sub
        return [field.parts[i].tolist()[0] for i in field.data], main, sub
    if main == GGUFValueType.STRING:
        return field.parts[field.data[0]].tobytes(), main, None
    return field.parts[field.data[0]].tolist()[0], main, None


def _block_count(reader, arch: str) -> int:
    field = reader.fields.get(f"{arch}.block_count")
    if field is None:
        raise LayershapError(f"the GGUF has no {arch}.block_count key; not a file layershap can prune")
    return int(field.parts[field.data[0]][0])


def _string(reader, key: str) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise LayershapError(f"the GGUF file has no {key} key")
    return field.parts[field.data[0]].tobytes().decode("utf-8", errors="replace")


def _positional_swa_pattern(reader, arch: str, n: int, kept: list[int]) -> list[bool] | None:
    """The kept blocks' sliding-window flags, when llama.cpp would otherwise place them by position and the
    positions moved; None when nothing needs writing (no such architecture, an array already sliced, or a
    pattern that still holds)."""
    if arch not in _POSITIONAL_SWA:
        return None
    period, needs_window = _POSITIONAL_SWA[arch]
    field = reader.fields.get(f"{arch}.attention.sliding_window_pattern")
    if field is not None and len(field.types) > 1:
        return None  # already a per-layer array: sliced with the others
    if field is not None:
        period = int(field.parts[field.data[0]][0])
    if needs_window:
        window = reader.fields.get(f"{arch}.attention.sliding_window")
        if window is None or int(window.parts[window.data[0]][0]) <= 0:
            return None

    def flags(count: int) -> list[bool]:  # llama.cpp's llama_hparams::set_swa_pattern (not dense-first)
        return [period == 0 or i % period < period - 1 for i in range(count)]

    before = flags(n)
    pattern = [before[i] for i in kept]
    return None if pattern == flags(len(kept)) else pattern


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def wants_gguf(out, out_format: str | None) -> bool:
    """Whether `prune` writes a GGUF file: --format gguf, or no --format and an --out ending in .gguf."""
    if out_format not in (None, "auto", "hf", "gguf", "decilm"):
        raise LayershapError(f"unknown --format {out_format!r}; use hf, gguf or decilm")
    return out_format == "gguf" or (out_format in (None, "auto") and str(out).lower().endswith(".gguf"))


def gguf_source_for(model_name: str | None, quantize: str | None = None) -> Path:
    """The GGUF file a pruned GGUF is copied from (the embedded default's when no model is named), checked
    before any block is chosen."""
    from layershap.models.load import default_gguf_file

    if quantize is not None:
        raise LayershapError("--quantize applies to a Hugging Face directory; a GGUF output keeps the input "
                             "file's own quantization. Drop --quantize, or give an --out directory")
    source = default_gguf_file() if model_name is None else Path(model_name).expanduser()
    check_gguf_exportable(source)
    return source
