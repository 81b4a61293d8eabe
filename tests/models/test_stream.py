"""Streamed blocks (models/stream.py) and the memory check (models/memory.py): a streamed model measures
exactly what the loaded one does, and a model that does not fit is streamed or refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

import layershap
from layershap.errors import LayershapError
from layershap.game.context import model_fingerprint
from layershap.game.nll import mean_nll
from layershap.game.prefix import PrefixSharingEvaluator, plain_nlls
from layershap.models.memory import plan_memory
from layershap.models.stream import load_streamed, streamer_of
from layershap.models.trace import traced_pass


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_model(request.param).save_pretrained(path)
    from transformers import AutoModelForCausalLM

    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _masks(n=6):
    masks = np.random.default_rng(1).random((12, n)) > 0.4
    masks[0] = True
    masks[1] = False
    return masks


def test_streamed_nlls_equal_the_loaded_model_bit_for_bit(saved):
    path, loaded = saved
    streamed = load_streamed(path, dtype=torch.float32, device=torch.device("cpu"), resident_bytes=1)
    tokens = torch.randint(0, 320, (5, 16), generator=torch.Generator().manual_seed(0))
    masks = _masks()
    want = plain_nlls(loaded, tokens, masks, batch_size=2)
    assert np.array_equal(plain_nlls(streamed, tokens, masks, batch_size=2), want)
    assert np.array_equal(PrefixSharingEvaluator(streamed, tokens, batch_size=2).nlls(masks), want)
    streamer = streamer_of(streamed)
    assert streamer.loads > 6 and sum(b.loaded for b in streamer.blocks) == 1  # one resident at a time
    assert model_fingerprint(streamed) == model_fingerprint(loaded)


def test_streamed_trace_equals_the_loaded_models(saved):
    path, loaded = saved
    streamed = load_streamed(path, dtype=torch.float32, device=torch.device("cpu"), offload="cpu")
    tokens = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(2))
    seen = {}
    for name, model in (("loaded", loaded), ("streamed", streamed)):
        outs = []
        traced_pass(model, tokens, lambda i, h_in, h_out, outs=outs: outs.append(h_out.clone()), batch_size=2)
        seen[name] = outs
    assert all(torch.equal(a, b) for a, b in zip(seen["loaded"], seen["streamed"], strict=True))
    assert len(streamer_of(streamed).host_cache) > 0  # offload cpu keeps the converted tensors on the host


def test_load_model_streams_when_asked_and_measures_the_same(tiny_model_dir):
    plain, _ = layershap.load_model(str(tiny_model_dir), offload="none")
    streamed, _ = layershap.load_model(str(tiny_model_dir), offload="disk")
    assert streamer_of(plain) is None and streamer_of(streamed) is not None
    tokens = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(3))
    assert mean_nll(streamed, tokens, batch_size=2) == mean_nll(plain, tokens, batch_size=2)


def test_auto_streams_a_model_that_does_not_fit_and_says_so(tiny_model_dir, monkeypatch, capsys):
    model_bytes = sum(p.numel() for p in tiny_model("llama").parameters()) * 4
    # room for the embeddings, the head and two of the six blocks, not for all of it
    monkeypatch.setenv("LAYERSHAP_HOST_BYTES", str((1 << 30) + model_bytes * 3 // 4))
    model, _ = layershap.load_model(str(tiny_model_dir), batch_size=1, seq_len=1)
    assert streamer_of(model) is not None
    assert "streaming its blocks" in capsys.readouterr().err


def test_a_model_that_does_not_fit_is_refused_in_one_line(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LAYERSHAP_HOST_BYTES", str(1 << 30))
    with pytest.raises(LayershapError, match="does not fit") as info:
        layershap.load_model(str(tiny_model_dir), offload="none", batch_size=1, seq_len=8)
    assert "\n" not in str(info.value) and "--offload auto" in str(info.value)


def _plan(**kwargs):
    """The check for a Llama-3-8B-sized model (tiny config: its activations are negligible)."""
    config = tiny_model("llama").config
    config.dtype = torch.bfloat16
    kwargs = {"parameters": 8 * 10**9, "block_parameters": 218 * 10**6, "outside_parameters": 1050 * 10**6,
              "config": config, "dtype": "auto", "device": torch.device("cpu"), "batch_size": 8, "seq_len": 128,
              **kwargs}
    return plan_memory(**kwargs)


def test_cpu_auto_keeps_float32_when_it_fits_and_says_what_it_chose_when_not():
    assert _plan(host_bytes=64 * 10**9).dtype == torch.float32 and not _plan(host_bytes=64 * 10**9).stream
    streamed = _plan(host_bytes=24 * 10**9)
    assert streamed.stream and streamed.dtype == torch.float32 and "kept float32" in streamed.note
    half = _plan(host_bytes=24 * 10**9, offload="none")
    assert half.dtype == torch.bfloat16 and not half.stream and "chose bfloat16" in half.note
    with pytest.raises(LayershapError, match="smaller --batch-size"):
        _plan(host_bytes=2 * 10**9)
    with pytest.raises(LayershapError, match="unknown --offload"):
        _plan(host_bytes=2 * 10**9, offload="gpu")


def test_gpu_streams_from_host_memory_when_the_host_holds_the_model():
    plan = _plan(device=torch.device("cuda"), device_bytes=12 * 10**9, host_bytes=100 * 10**9)
    assert plan.stream and plan.offload == "cpu" and plan.dtype == torch.bfloat16
    assert _plan(device=torch.device("cuda"), device_bytes=12 * 10**9, host_bytes=10 * 10**9).offload == "disk"


def test_streaming_a_hub_id_asks_for_a_download():
    with pytest.raises(LayershapError, match="download"):
        layershap.load_model("someone/some-model", offload="disk")


def test_streamed_save_loads_with_plain_transformers_and_equals_the_pruned_model(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from layershap.models.layers import prune_layers
    from layershap.models.save import save_pruned

    source = tmp_path / "source"
    tiny_model("qwen2").save_pretrained(source, max_shard_size="40KB")  # several shards and an index
    assert (source / "model.safetensors.index.json").is_file()
    streamed = load_streamed(source, dtype=torch.float32, device=torch.device("cpu"))
    prune_layers(streamed, [1, 4])
    save_pruned(streamed, tiny_tokenizer, tmp_path / "out", {"removed": [1, 4]})
    in_memory = prune_layers(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval(), [1, 4])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 4 and reloaded.config.layer_types == in_memory.config.layer_types
    assert reloaded.config.max_window_layers == in_memory.config.max_window_layers
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=tokens).logits, in_memory(input_ids=tokens).logits)
    assert (tmp_path / "out" / "layershap.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("method", ["shortgpt", "angular", "loo", "sleb"])
def test_methods_choose_on_a_streamed_model_what_they_choose_on_the_loaded_one(saved, method):
    from layershap.data.windows import TextWindows
    from layershap.plan.methods import METHODS

    path, loaded = saved
    streamed = load_streamed(path, dtype=torch.float32, device=torch.device("cpu"))
    tokens = TextWindows(torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(5)), "random",
                         "calibration", 0)
    want, got = METHODS[method](loaded, tokens, 2, batch_size=2), METHODS[method](streamed, tokens, 2, batch_size=2)
    assert got.remove == want.remove and got.scores == want.scores and _timeless(got.details) == _timeless(want.details)


def _timeless(value):
    """A plan's details without its timings."""
    if isinstance(value, dict):
        return {key: _timeless(item) for key, item in value.items() if key != "seconds"}
    if isinstance(value, list):
        return [_timeless(item) for item in value]
    return value
