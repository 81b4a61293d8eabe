"""How fast and how big a model is: latency, throughput, parameters, KV cache per token, size on disk and peak
memory.

`bench` measures one model on its own device; `compare_bench` lines several results up against the first
(e.g. dense, pruned, pruned+int8) with ratios, ready for a table.

What is measured, all under `torch.inference_mode()` after `warmup` untimed runs, as the median of
`repeats` timed runs (with `torch.cuda.synchronize` around every timing on a GPU):

- `prefill_ms`: one forward pass over a single prompt of `prompt_len` tokens with the cache switched on,
  returning only the last position's logits when the model supports it (as `generate` does).
- `decode_ms_per_token`: the per-token cost of decoding with the KV cache (or a recurrent model's state),
  at batch size 1. It is measured *inside* one `model.generate(min_new_tokens=max_new_tokens=new_tokens,
  do_sample=False)` call by a streamer that timestamps every token as `generate` hands it over (the token
  is copied to the host, which waits for the device): the mean gap between consecutive generated tokens.
  The first token comes out of the prefill pass, so prefill is excluded by construction rather than
  subtracted from a separate run; the gaps include `generate`'s own per-step work (logits processing,
  stopping checks), which any user of `generate` pays too.
- `throughput`: for each batch size, `batch_size * new_tokens / wall time of the whole generate call`
  (`tokens_per_s`, prefill included, what a caller sees), plus `decode_tokens_per_s` from the decode gaps
  alone. Batch size 1 is always measured, since the latency figures are defined at it. RWKV runs at batch
  size 1 only: upstream stateful generation is wrong for batch > 1; the result's `notes` say so.
- parameters in total, inside the decoder blocks, and outside them (embeddings, final norm, head; tied
  weights counted once).
- `kv_cache_bytes_per_token`: what the KV cache grows by per token of context, read off the config, not
  measured: kept attention layers x 2 (keys and values) x key-value heads x head size x the model's bytes per
  element. An attention a sublayer plan removed keeps no cache (`kv_sharing_modes` "reuse"), so it does not
  count, while a block plan removes whole blocks, attention and cache included. A recurrent model's state does
  not grow with the context: 0. A sliding-window layer stops growing at its window, which this per-token
  figure does not show.
- `disk_bytes`: the weight files of `model_dir` (`*.safetensors`, or `*.bin` when there are none).
- peak memory, labelled by `peak_memory_kind`: on CUDA `torch.cuda.max_memory_allocated` over the run
  (absolute, so it includes the weights); on CPU the growth of the process's peak resident set size over
  the run. On Linux the kernel's peak-RSS mark is reset before the run (`/proc/self/clear_refs`), so the
  growth is exact; elsewhere it is the growth of `getrusage`'s lifetime maximum, a lower bound (a higher
  peak before the run hides growth during it).

Input tokens are random ids below the vocabulary size, drawn from a seeded `torch.Generator`, so every
model in a comparison sees the same prompts.
"""

from __future__ import annotations

import inspect
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from layershap.errors import LayershapError

DECODE_METHOD = ("mean gap between consecutive generated tokens inside one generate() call with the cache on "
                 "(timestamped by a streamer); the prefill pass that yields the first token is excluded")
RWKV_NOTE = ("RWKV: measured at batch size 1 only, because upstream stateful generation is wrong for batch "
             "sizes above 1")


def bench(model, *, batch_sizes: Sequence[int] = (1, 4), prompt_len: int = 128, new_tokens: int = 32,
          repeats: int = 3, warmup: int = 1, model_dir: str | os.PathLike | None = None, seed: int = 0) -> dict:
    """Measure latency, throughput, parameters, disk size and peak memory of `model` on its own device.

    Returns a JSON-ready dict; every unit is in its key name (ms, bytes, tokens_per_s). See the module
    docstring for exactly what each figure means.
    """
    from layershap.models.architectures import architecture_of
    from layershap.models.layers import num_layers

    _check_settings(batch_sizes, prompt_len, new_tokens, repeats, warmup)
    arch = architecture_of(model)
    _check_context(model, prompt_len + new_tokens)
    device = _device_of(model)
    notes: list[str] = []
    sizes = sorted({1, *(int(b) for b in batch_sizes)})
    if arch.name == "rwkv":
        if len(sizes) > 1:
            notes.append(RWKV_NOTE)
        sizes = [1]

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab_size(model), (max(sizes), prompt_len), generator=generator).to(device)
    disk = disk_bytes(model_dir) if model_dir is not None else None

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _PeakMemory(device) as memory:
            prefill = _prefill_ms(model, ids[:1], device, repeats, warmup)
            throughput = [_generate_stats(model, ids[:bs], new_tokens, device, repeats, warmup) for bs in sizes]
    finally:
        model.train(was_training)

    at_one = throughput[0]
    return {
        "model_type": model.config.model_type,
        "architecture_kind": arch.kind,
        "num_layers": num_layers(model),
        "device": str(device),
        "dtype": _dtype_name(model),
        "torch_threads": torch.get_num_threads(),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "prefill_ms": prefill,
        "decode_ms_per_token": at_one["decode_ms_per_token"],
        "decode_method": DECODE_METHOD,
        "throughput": throughput,
        **param_counts(model),
        **kv_cache_per_token(model),
        "model_dir": str(model_dir) if model_dir is not None else None,
        "disk_bytes": disk,
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_kind": memory.kind,
        "memory_before_bytes": memory.before_bytes,
        "notes": notes,
    }


def compare_bench(results: dict[str, dict]) -> list[dict]:
    """One flat row per named result, with ratios against the first one (the baseline).

    Speedups are baseline latency / latency (or throughput / baseline throughput), so above 1 is faster;
    `params_ratio`, `kv_cache_ratio`, `disk_ratio` and `memory_ratio` are value / baseline value, so below 1 is smaller. A
    ratio is None when either side is missing or zero, and `memory_ratio` is None when the two peaks were
    measured differently (`peak_memory_kind`).
    """
    if not results:
        return []
    names = list(results)
    base = results[names[0]]
    sizes: list[int] = []
    for result in results.values():
        for entry in result.get("throughput") or []:
            if entry["batch_size"] not in sizes:
                sizes.append(entry["batch_size"])
    base_tps = _tokens_per_s(base)
    rows = []
    for name in names:
        r = results[name]
        row = {
            "name": name,
            "device": r.get("device"),
            "dtype": r.get("dtype"),
            "num_layers": r.get("num_layers"),
            "prefill_ms": r.get("prefill_ms"),
            "prefill_speedup": _ratio(base.get("prefill_ms"), r.get("prefill_ms")),
            "decode_ms_per_token": r.get("decode_ms_per_token"),
            "decode_speedup": _ratio(base.get("decode_ms_per_token"), r.get("decode_ms_per_token")),
        }
        tps = _tokens_per_s(r)
        for bs in sizes:
            row[f"tokens_per_s_bs{bs}"] = tps.get(bs)
            row[f"throughput_speedup_bs{bs}"] = _ratio(tps.get(bs), base_tps.get(bs))
        same_kind = r.get("peak_memory_kind") == base.get("peak_memory_kind")
        row.update({
            "params_total": r.get("params_total"),
            "params_ratio": _ratio(r.get("params_total"), base.get("params_total")),
            "kv_cache_bytes_per_token": r.get("kv_cache_bytes_per_token"),
            "kv_cache_ratio": _ratio(r.get("kv_cache_bytes_per_token"), base.get("kv_cache_bytes_per_token")),
            "disk_bytes": r.get("disk_bytes"),
            "disk_ratio": _ratio(r.get("disk_bytes"), base.get("disk_bytes")),
            "peak_memory_bytes": r.get("peak_memory_bytes"),
            "peak_memory_kind": r.get("peak_memory_kind"),
            "memory_ratio": _ratio(r.get("peak_memory_bytes"), base.get("peak_memory_bytes")) if same_kind else None,
        })
        rows.append(row)
    return rows


def param_counts(model) -> dict:
    """Parameters in total, inside the decoder blocks, and outside them; shared (tied) tensors count once."""
    from layershap.models.layers import block_list

    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in block_list(model).parameters())
    return {"params_total": total, "params_blocks": blocks, "params_outside_blocks": total - blocks}


def kv_cache_per_token(model) -> dict:
    """The layers that keep a KV cache and the bytes the cache grows by per token (see the module docstring)."""
    from layershap.models.architectures import architecture_of
    from layershap.models.layers import num_layers
    from layershap.models.sublayers import KV_CACHE_KEY

    if architecture_of(model).kind != "transformer":
        return {"kv_cache_layers": 0, "kv_cache_bytes_per_token": 0}
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = num_layers(model)
    modes = getattr(config, KV_CACHE_KEY, None)
    layers = n - (sum(mode == "reuse" for mode in modes) if isinstance(modes, list) and len(modes) == n else 0)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = getattr(torch, _dtype_name(model)).itemsize
    return {"kv_cache_layers": layers, "kv_cache_bytes_per_token": layers * 2 * kv_heads * head_dim * element}


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint directory: its `*.safetensors`, or its `*.bin` when it has none
    (transformers loads safetensors first, so a directory holding both is counted once). A file is itself."""
    path = Path(model_dir).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LayershapError(f"model directory {model_dir} does not exist; give the directory the model was "
                             "loaded from")
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        files = sorted(p for p in path.glob("*.bin") if p.is_file() and p.name != "training_args.bin")
    if not files:
        raise LayershapError(f"{model_dir} holds no weight files (*.safetensors or *.bin); give a directory "
                             "written by save_pretrained")
    return files


def disk_bytes(model_dir: str | os.PathLike) -> int:
    """Size on disk of a checkpoint's weight files, in bytes (see `weight_files`)."""
    return sum(p.stat().st_size for p in weight_files(model_dir))


# --- measuring ------------------------------------------------------------------------------------------


class _TokenClock:
    """A `generate` streamer that only timestamps: first the prompt, then every generated token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _prefill_ms(model, ids: torch.Tensor, device: torch.device, repeats: int, warmup: int) -> float:
    kwargs = {"input_ids": ids, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    for _ in range(warmup):
        model(**kwargs)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model(**kwargs)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _generate_stats(model, ids: torch.Tensor, new_tokens: int, device: torch.device, repeats: int,
                    warmup: int) -> dict:
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
              "do_sample": False, "num_beams": 1, "pad_token_id": _pad_token_id(model)}
    for _ in range(warmup):
        model.generate(ids, **kwargs)
    total_ms, first_ms, gap_ms = [], [], []
    for _ in range(repeats):
        clock = _TokenClock()
        _sync(device)
        start = time.perf_counter()
        out = model.generate(ids, streamer=clock, **kwargs)
        _sync(device)
        end = time.perf_counter()
        generated = out.shape[1] - ids.shape[1]
        tokens = clock.times[1:]  # the first put is the prompt
        if generated != new_tokens or len(tokens) != new_tokens:
            raise LayershapError(f"generate produced {generated} tokens instead of {new_tokens}; this model's "
                                 "generation stops early and cannot be benchmarked")
        total_ms.append((end - start) * 1e3)
        first_ms.append((tokens[0] - start) * 1e3)
        gap_ms.append((tokens[-1] - tokens[0]) * 1e3 / (new_tokens - 1))
    bs = ids.shape[0]
    total, decode = statistics.median(total_ms), statistics.median(gap_ms)
    return {
        "batch_size": bs,
        "generate_ms": total,
        "time_to_first_token_ms": statistics.median(first_ms),
        "decode_ms_per_token": decode,
        "tokens_per_s": bs * new_tokens / (total / 1e3),
        "decode_tokens_per_s": bs / (decode / 1e3) if decode > 0 else math.inf,
    }


class _PeakMemory:
    """Peak memory over a `with` block: CUDA's allocator peak, or the growth of the process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.before_bytes: int | None = None
        self.kind = "unavailable"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.before_bytes = _current_rss()
            self._hwm_reset = _reset_peak_rss()
            self._maxrss_before = _maxrss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.kind = "cuda_max_memory_allocated"
            return
        hwm = _peak_rss_since_reset() if self._hwm_reset else None
        if hwm is not None and self.before_bytes is not None:
            self.peak_bytes = max(0, hwm - self.before_bytes)
            self.kind = "cpu_peak_rss_growth"
            return
        after = _maxrss()
        if after is not None and self._maxrss_before is not None:
            self.peak_bytes = max(0, after - self._maxrss_before)
            self.kind = "cpu_max_rss_growth_lower_bound"


def _current_rss() -> int | None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.Process().memory_info().rss)
        except (psutil.Error, OSError):
            pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; Linux only, False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss_since_reset() is not None
    except OSError:
        return False


def _peak_rss_since_reset() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss() -> int | None:
    """The process's lifetime peak RSS in bytes (kilobytes on Linux, bytes on macOS), or None."""
    try:
        import resource
    except ImportError:
        return None
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024


# --- helpers --------------------------------------------------------------------------------------------


def _check_settings(batch_sizes, prompt_len, new_tokens, repeats, warmup) -> None:
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise LayershapError(f"batch sizes must be positive integers; got {list(batch_sizes)}")
    if prompt_len < 1:
        raise LayershapError(f"prompt length must be at least 1 token; got {prompt_len}")
    if new_tokens < 2:
        raise LayershapError(f"new tokens must be at least 2 (decode latency is the gap between generated "
                             f"tokens); got {new_tokens}")
    if repeats < 1:
        raise LayershapError(f"repeats must be at least 1; got {repeats}")
    if warmup < 0:
        raise LayershapError(f"warmup must be 0 or more; got {warmup}")


def _check_context(model, length: int) -> None:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and length > limit:
        raise LayershapError(f"prompt length + new tokens = {length} exceeds the model's context of {limit} "
                             "positions; lower --prompt-len or --new-tokens")


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _dtype_name(model) -> str:
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def _vocab_size(model) -> int:
    sizes = [getattr(model.config, "vocab_size", None)]
    try:
        sizes.append(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError):
        pass
    sizes = [int(s) for s in sizes if isinstance(s, int) and s > 0]
    if not sizes:
        raise LayershapError("cannot tell this model's vocabulary size (no config.vocab_size)")
    return min(sizes)


def _pad_token_id(model) -> int:
    """generate wants a pad id; all sequences have the same length, so any valid id will do."""
    for source in (model.generation_config, model.config):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int) and 0 <= pad < _vocab_size(model):
            return pad
    for source in (model.generation_config, model.config):
        eos = getattr(source, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and 0 <= eos < _vocab_size(model):
            return eos
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens_per_s(result: dict) -> dict[int, float]:
    return {e["batch_size"]: e.get("tokens_per_s") for e in result.get("throughput") or []}


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None:
        return None
    try:
        num, den = float(numerator), float(denominator)
    except (TypeError, ValueError):
        return None
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den
