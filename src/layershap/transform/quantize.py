"""Weight-only quantization of a (pruned) model with torchao, saved so that plain `transformers` reloads it.

Schemes:
- `int8`: torchao `Int8WeightOnlyConfig` (one int8 per weight, one scale per output row), on CPU and CUDA.
- `int4`: on CPU, torchao `IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
  mapping_type=ASYMMETRIC)`: 4-bit values with one scale and zero point per 32 weights, kept unpacked in int8
  bytes and dequantized for each matmul (the only 4-bit layout torchao can both run on a stock CPU build and
  write to safetensors, so it saves no memory over int8; it is there for its accuracy cost and for later
  packing). On CUDA with
  bfloat16 weights and a compute capability of 8.0 or more, torchao `Int4WeightOnlyConfig(group_size=128,
  int4_packing_format="tile_packed_to_4d")`: packed 4-bit weights run by PyTorch's tinygemm kernel; other
  CUDA set-ups fall back to the CPU layout.

Every `nn.Linear` is quantized except the output embedding (`lm_head`, often tied to the input embedding),
layers whose weight the model reads directly instead of calling the layer (Mamba's `dt_proj`), and, for
int4, layers whose input width is not a multiple of the group size. The model is quantized in memory
(`torchao.quantize_`), given a `TorchAoConfig` and transformers' torchao quantizer, and saved with
`save_pretrained` as safetensors; `AutoModelForCausalLM.from_pretrained(dir)` (torchao installed) then
rebuilds the same tensors, so the reloaded model gives bit-identical logits.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from layershap.errors import LayershapError

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZE = 32
CUDA_INT4_GROUP_SIZE = 128
INSTALL_HINT = "pip install 'layershap[quant]'"
# Linear layers whose weight a family's forward pass reads directly (`self.dt_proj.weight @ x`) instead of
# calling the layer: a quantized weight there fails, and a LoRA adapter there would never be trained.
DIRECT_WEIGHT_READS: dict[str, tuple[str, ...]] = {"mamba": ("dt_proj",), "falcon_mamba": ("dt_proj",)}


# -- checks that run before any work -------------------------------------------------------------------------

def check_scheme(scheme: str, device: torch.device | str | None = None) -> None:
    """Refuse an unknown scheme, a missing torchao, or int4 on a device torchao has no path for."""
    if scheme not in SCHEMES:
        raise LayershapError(f"unknown quantization scheme {scheme!r}; use {' or '.join(SCHEMES)}")
    if importlib.util.find_spec("torchao") is None:
        raise LayershapError(f"quantization needs the torchao package: {INSTALL_HINT}")
    try:
        import torchao.prototype.safetensors.safetensors_support  # noqa: F401
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig  # noqa: F401
    except ImportError as exc:
        raise LayershapError(f"the installed torchao is too old to save quantized models ({exc}); "
                             "pip install -U 'layershap[quant]' (torchao >= 0.14)") from None
    if device is not None:
        kind = torch.device(device).type
        if scheme == "int4" and kind not in ("cpu", "cuda"):
            raise LayershapError(
                f"int4 on {kind} has no torchao path in layershap (CPU: torchao's intx layout; CUDA: the tinygemm "
                "kernel of PyTorch's CUDA build, or the mslk package; Intel XPU would need an XPU build of "
                "PyTorch for torchao's plain_int32 layout); use --device cpu or cuda, or int8")


def check_quantizable(model, scheme: str) -> None:
    """Everything `quantize_model` checks before it changes the model: the scheme and torchao (see
    `check_scheme`), that the model is not quantized already, and that it has layers torchao can quantize."""
    check_scheme(scheme, next(model.parameters()).device)
    existing = quantization_of(model)
    if existing is not None:
        raise LayershapError(f"this model is already quantized ({existing.get('scheme') or existing['method']}); "
                             "quantize the float model instead")
    quantization_targets(model, scheme)


def quantization_of(model) -> dict | None:
    """The layershap record of a model quantized here, a short record for any other quantized model, or
    None for a model with plain weights."""
    record = getattr(model, "_layershap_quantization", None)
    if record is not None:
        return record
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model.config, "quantization_config", None)
    if quantizer is None and config is None and not _has_subclass_weights(model):
        return None
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if method is None and config is not None:
        method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return {"method": str(getattr(method, "value", method) or "unknown")}


def _has_subclass_weights(model) -> bool:
    """Weights that are tensor subclasses (torchao, bitsandbytes, ...) rather than plain tensors."""
    return any(type(p) not in (torch.nn.Parameter, torch.Tensor) for p in model.parameters())


# -- what is quantized ---------------------------------------------------------------------------------------

def quantization_targets(model, scheme: str) -> tuple[list[str], dict[str, str]]:
    """(names of the Linear layers to quantize, {name: why it stays in float} for the other Linear layers)."""
    from layershap.models.architectures import architecture_of

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    direct = DIRECT_WEIGHT_READS.get(model.config.model_type, ())
    group = _group_size(scheme, model)
    targets, kept = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is output:
            kept[name] = "output embedding"
        elif name.rsplit(".", 1)[-1] in direct:
            kept[name] = "weight read directly by the model"
        elif group and module.in_features % group:
            kept[name] = f"input width {module.in_features} is not a multiple of the group size {group}"
        else:
            targets.append(name)
    if not targets:
        arch = architecture_of(model)
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        why = (f"its blocks hold their weights in Conv1D layers ({len(conv1d)} of them), which torchao's "
               "weight-only configs do not quantize" if conv1d else "it has no nn.Linear layer torchao could quantize")
        raise LayershapError(f"cannot quantize this {arch.name} model with {scheme}: {why}")
    return targets, kept


def _group_size(scheme: str, model) -> int | None:
    if scheme != "int4":
        return None
    return CUDA_INT4_GROUP_SIZE if _uses_tinygemm(model) else INT4_GROUP_SIZE


def _uses_tinygemm(model) -> bool:
    """CUDA int4 runs on tinygemm only with bfloat16 weights on compute capability >= 8.0."""
    param = next(model.parameters())
    if param.device.type != "cuda" or param.dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(param.device)[0] >= 8


def torchao_config(scheme: str, model):
    """(torchao config object, short description) for the scheme on the model's device and dtype."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType, PerGroup

    if scheme == "int8":
        return Int8WeightOnlyConfig(), "Int8WeightOnlyConfig() (int8 per output row)"
    if _uses_tinygemm(model):
        from torchao.quantization import Int4WeightOnlyConfig

        config = Int4WeightOnlyConfig(group_size=CUDA_INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
        return config, (f"Int4WeightOnlyConfig(group_size={CUDA_INT4_GROUP_SIZE}, "
                        "int4_packing_format=tile_packed_to_4d) (packed int4, CUDA tinygemm kernel)")
    # Asymmetric (a zero point per group) measured clearly better than symmetric on SmolLM2-135M (wiki
    # perplexity 25.8 against 30.9; float 21.2); see docs/quantization.md.
    config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE),
                                  mapping_type=MappingType.ASYMMETRIC)
    return config, (f"IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup({INT4_GROUP_SIZE}), "
                    "mapping_type=ASYMMETRIC) (int4 values unpacked to int8, dequantized per matmul)")


# -- quantize, measure, save ---------------------------------------------------------------------------------

def quantize_model(model, scheme: str):
    """Quantize the model's Linear weights in place with torchao and return it, ready for `save_quantized`.

    Raises LayershapError (the model is then unusable) when the quantized model cannot run a forward pass.
    The record of what was done is `quantization_of(model)`.
    """
    from layershap.models.architectures import architecture_of

    device = next(model.parameters()).device
    check_quantizable(model, scheme)
    arch = architecture_of(model)
    import torchao
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    targets, kept = quantization_targets(model, scheme)
    config, description = torchao_config(scheme, model)
    before = weight_bytes(model)
    wanted = set(targets)
    try:
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in wanted)
    except (RuntimeError, NotImplementedError, AssertionError, ValueError) as exc:
        raise LayershapError(f"torchao could not quantize this {arch.name} model with {scheme} ({_first(exc)}); "
                             "try the other scheme") from None
    _probe(model, arch, scheme)
    hf_config = TorchAoConfig(config, modules_to_not_convert=sorted(kept) or None)
    model.config.quantization_config = hf_config
    model.hf_quantizer = TorchAoHfQuantizer(hf_config, pre_quantized=False)
    model._layershap_quantization = {
        "scheme": scheme,
        "method": "torchao",
        "config": description,
        "torchao_version": torchao.__version__,
        "device": str(device),
        "quantized_layers": len(targets),
        "float_layers": kept,
        "weight_bytes_before": before,
        "weight_bytes_after": weight_bytes(model),
    }
    return model


def _probe(model, arch, scheme: str) -> None:
    """One short forward pass: some families read weights in ways a quantized tensor does not support."""
    device = next(model.parameters()).device
    ids = torch.zeros((1, 4), dtype=torch.long, device=device)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    except (RuntimeError, NotImplementedError, AssertionError, TypeError) as exc:
        raise LayershapError(f"--quantize {scheme} does not apply to this {arch.name} model: torchao's quantized "
                             f"weights fail in its forward pass ({_first(exc)}); use the other scheme or keep "
                             "it in float") from None


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    missing = re.search(r"(\w+) dispatch: attempting to run unimplemented operator/function: "
                        r"func=<OpOverload\(op='([^']+)'", text)
    if missing:
        return f"torchao's {missing[1]} does not implement {missing[2]}"
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def weight_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers, counting a torchao tensor by its inner tensors and a
    tied tensor once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor) -> int:
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)


def checkpoint_bytes(directory) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def save_quantized(model, tokenizer, out, record: dict | None = None) -> Path:
    """`save_pretrained` the quantized model (safetensors with torchao metadata) and tokenizer into `out`, and
    write `layershap.json` (and the model card, README.md): `record` plus `quantization` (scheme, torchao config, layers kept in float, bytes
    in memory and on disk). Plain `transformers` with torchao installed reloads the directory."""
    from layershap.io import write_json
    from layershap.models.card import write_model_card
    from layershap.models.save import save_pruned

    quantization = quantization_of(model)
    if quantization is None or "scheme" not in quantization:
        raise LayershapError("save_quantized needs a model quantized by layershap.transform.quantize.quantize_model")
    out = save_pruned(model, tokenizer, out, keep_checkpoint_dtype=False)
    record = dict(record or {})
    record["quantization"] = {**record.get("quantization", {}), **quantization,
                              "checkpoint_bytes": checkpoint_bytes(out)}
    write_json(out / "layershap.json", record)
    write_model_card(out, record)
    return out


def quantize_run(model, tokenizer, *, scheme: str, out, model_name: str | None = None, eval_data=("wiki",),
                 eval_samples: int = 16, eval_seq_len: int = 256, seed: int = 0, batch_size: int = 8) -> dict:
    """Quantize a loaded model, measure held-out perplexity before and after, and save it to `out`.

    The record keeps what the source directory's `layershap.json` said (a pruned model stays described as
    such) and adds `quantization`."""
    from layershap.data.windows import text_windows
    from layershap.game.nll import perplexities_of
    from layershap.io import read_json
    from layershap.models.save import inherited_record

    check_quantizable(model, scheme)
    held_out = {name: text_windows(name, tokenizer, samples=eval_samples, seq_len=eval_seq_len, seed=seed,
                                   split="evaluation") for name in eval_data}
    before = perplexities_of(model, held_out, batch_size=batch_size)
    quantize_model(model, scheme)
    after = perplexities_of(model, held_out, batch_size=batch_size)
    record = inherited_record(model_name, model)
    record["quantization"] = {"ppl_before": before, "ppl_after": after,
                              "evaluation": {name: w.describe() for name, w in held_out.items()}}
    save_quantized(model, tokenizer, out, record)
    return read_json(Path(out) / "layershap.json")
