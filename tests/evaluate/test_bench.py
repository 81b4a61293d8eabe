"""bench and compare_bench: keys, units, exact parameter and disk accounting, ratio arithmetic.

Timings are only checked to exist and be positive, never compared: that would be flaky on shared CPUs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import tiny_model

import layershap
from layershap.evaluate.bench import (
    RWKV_NOTE,
    bench,
    compare_bench,
    disk_bytes,
    kv_cache_per_token,
    param_counts,
    weight_files,
)

FAST = {"prompt_len": 8, "new_tokens": 3, "repeats": 1, "warmup": 0}
TOP_KEYS = {"model_type", "architecture_kind", "num_layers", "device", "dtype", "torch_threads", "prompt_len",
            "new_tokens", "repeats", "warmup", "seed", "prefill_ms", "decode_ms_per_token", "decode_method",
            "throughput", "params_total", "params_blocks", "params_outside_blocks", "kv_cache_layers",
            "kv_cache_bytes_per_token", "model_dir", "disk_bytes",
            "peak_memory_bytes", "peak_memory_kind", "memory_before_bytes", "notes"}
BATCH_KEYS = {"batch_size", "generate_ms", "time_to_first_token_ms", "decode_ms_per_token", "tokens_per_s",
              "decode_tokens_per_s"}


@pytest.mark.parametrize("model_type", ["llama", "mamba", "rwkv"])
def test_bench_reports_every_figure(model_type):
    model = tiny_model(model_type)
    model.train()
    warm = {"repeats": 2, "warmup": 1} if model_type == "llama" else {}  # exercise warmup and the median once
    result = bench(model, batch_sizes=(2,), **{**FAST, **warm})

    assert set(result) == TOP_KEYS
    json.dumps(result)  # ready for --json output
    assert model.training, "bench must restore the model's training flag"
    assert result["model_type"] == model_type and result["num_layers"] == 6
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["torch_threads"] == torch.get_num_threads()
    assert result["prefill_ms"] > 0 and result["decode_ms_per_token"] > 0
    assert result["params_total"] == sum(p.numel() for p in model.parameters())
    assert result["params_blocks"] > 0 and result["params_outside_blocks"] > 0
    assert result["model_dir"] is None and result["disk_bytes"] is None
    assert result["peak_memory_kind"].startswith("cpu_")
    assert isinstance(result["peak_memory_bytes"], int) and result["memory_before_bytes"] > 0

    expected_sizes = [1] if model_type == "rwkv" else [1, 2]  # batch size 1 is always measured
    assert [e["batch_size"] for e in result["throughput"]] == expected_sizes
    for entry in result["throughput"]:
        assert set(entry) == BATCH_KEYS
        assert all(entry[k] > 0 for k in BATCH_KEYS)
    assert result["decode_ms_per_token"] == result["throughput"][0]["decode_ms_per_token"]
    assert result["notes"] == ([RWKV_NOTE] if model_type == "rwkv" else [])


def test_pruned_params_shrink_by_exactly_the_removed_blocks():
    dense = tiny_model("llama")
    removed = sum(p.numel() for i in (0, 1) for p in dense.model.layers[i].parameters())
    pruned = layershap.prune_layers(copy.deepcopy(dense), remove=[0, 1])

    small = {"batch_sizes": (1,), "prompt_len": 4, "new_tokens": 2, "repeats": 1, "warmup": 0}
    d, p = bench(dense, **small), bench(pruned, **small)
    assert p["num_layers"] == 4
    assert d["params_total"] - p["params_total"] == removed
    assert d["params_blocks"] - p["params_blocks"] == removed
    assert d["params_outside_blocks"] == p["params_outside_blocks"]
    assert d["params_blocks"] + d["params_outside_blocks"] == d["params_total"]


def test_tied_weights_count_once():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    counts = param_counts(model)
    assert counts["params_total"] == sum(unique.values())
    assert counts["params_outside_blocks"] == counts["params_total"] - counts["params_blocks"]


def measured_cache_bytes_per_token(model, length: int = 5) -> int:
    """Bytes the model's cache actually holds after a pass over `length` tokens, per token."""
    with torch.no_grad():
        cache = model(input_ids=torch.arange(1, length + 1)[None], use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
    assert held % length == 0
    return held // length


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2", "opt", "gpt_neox", "phi3"])
def test_kv_cache_per_token_is_what_the_cache_holds(model_type):
    model = tiny_model(model_type)
    figures = kv_cache_per_token(model)
    assert figures["kv_cache_layers"] == 6
    assert figures["kv_cache_bytes_per_token"] == measured_cache_bytes_per_token(model) > 0
    pruned = layershap.prune_layers(model, remove=[0, 1])
    assert kv_cache_per_token(pruned)["kv_cache_bytes_per_token"] == figures["kv_cache_bytes_per_token"] * 4 // 6


def test_kv_cache_of_a_sublayer_plan_leaves_out_removed_attentions():
    from layershap.models.sublayers import keep_sublayers, remove_sublayers

    model = tiny_model("llama")
    mask = [True] * 12
    mask[0] = mask[6] = mask[7] = mask[9] = False  # attn.0, block 3 whole, mlp.4 (its attention stays)
    dense = kv_cache_per_token(model)["kv_cache_bytes_per_token"]
    with keep_sublayers(model, mask):
        skipped = kv_cache_per_token(model)
        assert skipped == {"kv_cache_layers": 4, "kv_cache_bytes_per_token": dense * 4 // 6}
        assert measured_cache_bytes_per_token(model) == skipped["kv_cache_bytes_per_token"]
    assert kv_cache_per_token(remove_sublayers(copy.deepcopy(model), mask)) == skipped
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert kv_cache_per_token(half)["kv_cache_bytes_per_token"] == dense // 2


def test_recurrent_state_does_not_grow_per_token():
    assert kv_cache_per_token(tiny_model("mamba")) == {"kv_cache_layers": 0, "kv_cache_bytes_per_token": 0}


def test_disk_size_of_a_saved_checkpoint(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted((tmp_path / "ckpt").glob("*.safetensors"))
    assert files
    expected = sum(f.stat().st_size for f in files)
    assert disk_bytes(tmp_path / "ckpt") == expected

    result = bench(model, batch_sizes=(1,), prompt_len=4, new_tokens=2, repeats=1, warmup=0,
                   model_dir=str(tmp_path / "ckpt"))
    assert result["disk_bytes"] == expected and result["model_dir"] == str(tmp_path / "ckpt")


def test_weight_files_choice(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "model.safetensors").write_bytes(b"x" * 10)
    (both / "pytorch_model.bin").write_bytes(b"x" * 100)
    (both / "config.json").write_text("{}")
    assert disk_bytes(both) == 10  # transformers loads the safetensors; the .bin copy is not counted

    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "pytorch_model-00001-of-00002.bin").write_bytes(b"x" * 7)
    (bins / "pytorch_model-00002-of-00002.bin").write_bytes(b"x" * 5)
    (bins / "training_args.bin").write_bytes(b"x" * 1000)
    assert disk_bytes(bins) == 12
    assert [f.name for f in weight_files(bins)] == ["pytorch_model-00001-of-00002.bin",
                                                     "pytorch_model-00002-of-00002.bin"]

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 3)
    assert disk_bytes(gguf) == 3

    (tmp_path / "empty").mkdir()
    with pytest.raises(layershap.LayershapError, match="no weight files"):
        disk_bytes(tmp_path / "empty")
    with pytest.raises(layershap.LayershapError, match="does not exist"):
        disk_bytes(tmp_path / "missing")


def _result(prefill, decode, tps, params, disk, memory, kind="cpu_peak_rss_growth", kv=None):
    return {"device": "cpu", "dtype": "float32", "num_layers": 6, "prefill_ms": prefill,
            "decode_ms_per_token": decode,
            "throughput": [{"batch_size": bs, "tokens_per_s": v} for bs, v in tps.items()],
            "params_total": params, "kv_cache_bytes_per_token": kv, "disk_bytes": disk, "peak_memory_bytes": memory,
            "peak_memory_kind": kind}


def test_compare_bench_ratios():
    rows = compare_bench({
        "dense": _result(10.0, 2.0, {1: 100.0, 4: 300.0}, 1000, 4000, 800, kv=768),
        "pruned": _result(5.0, 1.6, {1: 125.0, 4: 450.0}, 600, 2400, 400, kv=384),
        "pruned+int8": _result(8.0, 1.0, {1: 150.0}, 600, 600, 1200, kind="cuda_max_memory_allocated"),
        "no disk": _result(20.0, 4.0, {1: 50.0, 4: 0.0}, 1000, None, 0),
    })
    assert [r["name"] for r in rows] == ["dense", "pruned", "pruned+int8", "no disk"]
    dense, pruned, int8, nodisk = rows

    for key in ("prefill_speedup", "decode_speedup", "throughput_speedup_bs1", "throughput_speedup_bs4",
                "params_ratio", "kv_cache_ratio", "disk_ratio", "memory_ratio"):
        assert dense[key] == 1.0
    assert pruned["kv_cache_bytes_per_token"] == 384 and pruned["kv_cache_ratio"] == 0.5
    assert rows[2]["kv_cache_ratio"] is None  # not known for it
    assert pruned["prefill_speedup"] == pytest.approx(2.0)
    assert pruned["decode_speedup"] == pytest.approx(1.25)
    assert pruned["tokens_per_s_bs4"] == 450.0
    assert pruned["throughput_speedup_bs1"] == pytest.approx(1.25)
    assert pruned["throughput_speedup_bs4"] == pytest.approx(1.5)
    assert pruned["params_ratio"] == pytest.approx(0.6)
    assert pruned["disk_ratio"] == pytest.approx(0.6)
    assert pruned["memory_ratio"] == pytest.approx(0.5)

    assert int8["prefill_speedup"] == pytest.approx(1.25)
    assert int8["decode_speedup"] == pytest.approx(2.0)
    assert int8["tokens_per_s_bs4"] is None and int8["throughput_speedup_bs4"] is None
    assert int8["disk_ratio"] == pytest.approx(0.15)
    assert int8["memory_ratio"] is None  # measured differently: not comparable

    assert nodisk["prefill_speedup"] == pytest.approx(0.5)
    assert nodisk["throughput_speedup_bs4"] == pytest.approx(0.0)
    assert nodisk["disk_ratio"] is None
    assert nodisk["memory_ratio"] == pytest.approx(0.0)

    assert compare_bench({}) == []
    zero_base = compare_bench({"a": _result(0.0, 1.0, {}, 0, 0, 0), "b": _result(1.0, 1.0, {}, 5, 5, 5)})
    assert zero_base[1]["params_ratio"] is None and zero_base[1]["disk_ratio"] is None
    assert zero_base[1]["memory_ratio"] is None and zero_base[1]["prefill_speedup"] == 0.0


def test_bench_rejects_bad_settings():
    model = tiny_model("llama")
    with pytest.raises(layershap.LayershapError, match="at least 2"):
        bench(model, new_tokens=1)
    with pytest.raises(layershap.LayershapError, match="context"):
        bench(model, prompt_len=250, new_tokens=10)
    with pytest.raises(layershap.LayershapError, match="batch sizes"):
        bench(model, batch_sizes=(0,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda_reports_allocator_peak():
    model = tiny_model("llama").to("cuda")
    result = bench(model, batch_sizes=(2,), **FAST)
    assert result["device"].startswith("cuda") and result["peak_memory_kind"] == "cuda_max_memory_allocated"
    assert result["peak_memory_bytes"] >= result["memory_before_bytes"] > 0
    assert result["prefill_ms"] > 0 and result["decode_ms_per_token"] > 0


def test_cpu_peak_memory_sees_an_allocation_freed_before_the_end():
    """The meter reports the peak, not what is left at the end: 256 MiB touched and freed inside must show."""
    from layershap.evaluate.bench import _PeakMemory

    size = 256 << 20
    with _PeakMemory(torch.device("cpu")) as meter:
        block = torch.ones(size // 4, dtype=torch.float32)  # ones(): every page touched, so resident
        del block
    assert meter.kind.startswith("cpu_")
    assert meter.peak_bytes >= size * 0.9, meter.peak_bytes
