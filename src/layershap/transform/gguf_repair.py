"""A repair written into a pruned GGUF without disturbing llama.cpp's arithmetic more than it must.

A repair touches few tensors (`transform/repair.py`): a scale multiplies whole output projections, a map
replaces one down projection by `T^T W`.

- A *scale* is absorbed by the quantization blocks' own scales: every GGUF quantization type stores each
  block of weights as integers times one or two float16 factors (`d`, and `m` or `dmin` for the types with
  an offset), so multiplying those factors multiplies every weight of the block and leaves the integers, and
  hence llama.cpp's integer dot products, as they are. The only change beyond the exact product is the
  float16 rounding of each new factor (relative 2^-11 at most), which the record reports. Float tensors are
  multiplied in their own type.
- A *map* mixes the columns of `W`, which no block scale can express, so the tensor is dequantized, mapped in
  float64, and requantized with the `gguf` library's quantizers in its original type where the library has
  one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16, F32), and written as Q8_0 otherwise (the K-quants, which the
  library does not quantize): a higher precision than the original, said in the record.
"""

from __future__ import annotations

import numpy as np

from layershap.errors import LayershapError

# Byte offsets of the float16 factors inside one quantization block, by type name (ggml-common.h's layouts).
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
                 "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
FLOAT_TYPES = ("F32", "F16", "BF16")
REQUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32")


def gguf_edits(repair, n_kept: int) -> dict[str, dict]:
    """The repair's tensor edits by their GGUF names in the pruned file (blocks numbered as kept)."""
    from layershap.transform.repair import MLP_OUT, WRITERS, tensor_edits

    names = {"self_attn.o_proj": "attn_output.weight", MLP_OUT: "ffn_down.weight"}
    return {f"blk.{edit.block}.{names[edit.module]}": {"factor": edit.factor, "map": edit.map}
            for edit in tensor_edits(repair, n_kept, WRITERS["llama"])}


def tensor_editor(repair, n_kept: int, report: dict):
    """A function for `write_pruned_gguf(edit_tensor=...)`: (name in the new file, raw data, type) -> (new data,
    new type) for the touched tensors, None for the rest; `report[name]` records what it did."""
    from gguf import GGMLQuantizationType

    edits = gguf_edits(repair, n_kept)

    def edit(name: str, data: np.ndarray, qtype):
        if name not in edits:
            return None
        new, type_name, done = edited_tensor(data, qtype.name, edits[name])
        report[name] = done
        return new, GGMLQuantizationType[type_name]

    return edit


def scale_quantized(data: np.ndarray, type_name: str, factor: float) -> tuple[np.ndarray, float]:
    """The raw bytes of a quantized tensor (`[rows, bytes per row]`, uint8) with every block's float16 factors
    multiplied by `factor`; returns the new bytes and the largest relative rounding error of a factor."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType[type_name]
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = np.array(data, dtype=np.uint8, copy=True)
    blocks = raw.reshape(-1, block_bytes)
    worst = 0.0
    for offset in SCALE_OFFSETS[type_name]:
        field = blocks[:, offset:offset + 2].copy().view(np.float16).reshape(-1)
        wanted = field.astype(np.float64) * factor
        stored = wanted.astype(np.float16)
        if not np.all(np.isfinite(stored[np.isfinite(wanted)])):
            raise LayershapError(f"a repair scale of {factor:.4g} overflows the float16 block scales of a "
                                 f"{type_name} tensor; write a directory instead (--out DIR)")
        nonzero = wanted != 0
        if nonzero.any():
            worst = max(worst, float(np.max(np.abs(stored[nonzero] - wanted[nonzero]) / np.abs(wanted[nonzero]))))
        blocks[:, offset:offset + 2] = stored.view(np.uint8).reshape(-1, 2)
    return raw.reshape(data.shape), worst


def edited_tensor(data: np.ndarray, type_name: str, edit: dict) -> tuple[np.ndarray, str, dict]:
    """One touched tensor as it goes into the file: (data, type name, what was done)."""
    from gguf import GGMLQuantizationType, quants

    factor, mapping = edit["factor"], edit["map"]
    if mapping is None and type_name in SCALE_OFFSETS:
        new, rounding = scale_quantized(data, type_name, factor)
        return new, type_name, {"type": type_name, "factor": factor, "how": "block scales",
                                "max_scale_rounding": rounding}
    qtype = GGMLQuantizationType[type_name]
    values = quants.dequantize(data, qtype).astype(np.float64)  # [out rows, in columns] as llama.cpp stores W
    if mapping is not None:
        T = mapping.double().numpy() if hasattr(mapping, "numpy") else np.asarray(mapping, dtype=np.float64)
        values = T.T @ values
    values = values * factor
    if type_name in FLOAT_TYPES and mapping is None:
        how, out_type = "multiplied", type_name
    else:
        out_type = type_name if type_name in REQUANTIZABLE else "Q8_0"
        how = "requantized" if out_type == type_name else f"requantized as Q8_0 (the gguf library cannot write {type_name})"
    if out_type == "F32":
        new = values.astype(np.float32)
    else:
        new = quants.quantize(values.astype(np.float32), GGMLQuantizationType[out_type])
    return new, out_type, {"type": out_type, "source_type": type_name, "factor": factor,
                           "map": mapping is not None, "how": how}
