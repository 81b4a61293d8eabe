"""Attention and MLP sublayers skip exactly on every family whose registry entry describes them.

The reference is built without the skipping machinery: the full model with a forward hook that replaces the
dropped branch's output by zeros (the branch still runs and still fills its KV cache, its result is thrown
away). Skipping must give the same logits to the last bit (torch.equal), with and without the KV cache in
generation, while the dropped branches do not run at all and a dropped attention keeps no cache.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_architectures import editable_model, generation_config, input_ids, logits
from tiny_models import COMMON, TINY_CONFIGS, VOCAB

from layershap.errors import LayershapError
from layershap.models.architectures import architecture_of
from layershap.models.layers import block_list
from layershap.models.sublayers import (
    KINDS,
    block_parameters,
    keep,
    keep_sublayers,
    kv_cache_fraction_removed,
    parse_sublayer,
    sublayer_names,
    sublayer_parameters,
)

EXTRA_CONFIGS = {
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=8),
    "olmo": lambda: transformers.OlmoConfig(**COMMON),
    "olmo2": lambda: transformers.Olmo2Config(**COMMON),
    "granite": lambda: transformers.GraniteConfig(**COMMON, residual_multiplier=0.5),
    "smollm3": lambda: transformers.SmolLM3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "starcoder2": lambda: transformers.Starcoder2Config(**COMMON),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        max_position_embeddings=256, use_parallel_residual=False),
}
RECURRENT = {"mamba", "mamba2", "rwkv"}
FAMILIES = [f for f in TINY_CONFIGS if f not in RECURRENT] + list(EXTRA_CONFIGS)
N = 6
# the first attention (the cache's layer 0), one MLP, a whole block, and the last attention
DROPPED = ["attn.0", "mlp.2", "attn.3", "mlp.3", "attn.5"]


def sub_model(family: str):
    if family in EXTRA_CONFIGS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(EXTRA_CONFIGS[family]())
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.add_(torch.randn_like(p) * 0.05)
        return model.eval()
    return editable_model(family)


def sub_mask(dropped=DROPPED) -> torch.Tensor:
    mask = [True] * (2 * N)
    for name in dropped:
        mask[parse_sublayer(name, N)] = False
    import numpy as np

    return np.array(mask)


def zeroing_reference(model, dropped=DROPPED):
    """A copy of the model whose dropped branches run but add zeros to the residual stream."""
    ref = copy.deepcopy(model)
    arch = architecture_of(ref)
    for name in dropped:
        kind, index = name.split(".")
        layout = arch.attention if kind == "attn" else arch.mlp
        module = block_list(ref)[int(index)]._modules[layout.module]

        def zero(mod, args, output, tuple_=layout.returns_tuple):
            if tuple_:
                return (torch.zeros_like(output[0]), *output[1:])
            return torch.zeros_like(output)
        module.register_forward_hook(zero)
    return ref


@torch.no_grad()
def generated_logits(model, ids, use_cache: bool) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), output_logits=True, return_dict_in_generate=True,
                         generation_config=generation_config(use_cache=use_cache))
    return torch.stack(out.logits)


def family_ids(family):
    return input_ids(family if family in TINY_CONFIGS else "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_sublayers_equals_zeroing_them(family):
    model = sub_model(family)
    ids = family_ids(family)
    full = logits(model, ids)
    ref = zeroing_reference(model)
    expected = logits(ref, ids)
    with keep_sublayers(model, sub_mask()):
        skipped = logits(model, ids)
    assert (skipped - full).abs().max() > 1e-3, "the dropped sublayers should matter"
    assert torch.equal(skipped, expected)
    assert torch.equal(logits(model, ids), full), "restored on exit"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_with_and_without_cache(family, use_cache):
    model = sub_model(family)
    ids = family_ids(family)[:, :12]
    expected = generated_logits(zeroing_reference(model), ids, use_cache)
    with keep_sublayers(model, sub_mask()):
        got = generated_logits(model, ids, use_cache)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_sublayers_do_not_run_and_hold_no_cache(family):
    model = sub_model(family)
    arch = architecture_of(model)
    calls = {}
    for i, block in enumerate(block_list(model)):
        for kind, layout in zip(KINDS, (arch.attention, arch.mlp)):
            block._modules[layout.module].register_forward_hook(
                lambda *_, key=f"{kind}.{i}": calls.__setitem__(key, calls.get(key, 0) + 1))
    ids = family_ids(family)[:, :12]
    with keep_sublayers(model, sub_mask()), torch.no_grad():
        out = model(ids, use_cache=True)
    assert sorted(calls) == sorted(set(sublayer_names(N)) - set(DROPPED))
    cache = out.past_key_values
    # blocks 0..5 without block 3: new positions 0, 1, 2, 3, 4 hold blocks 0, 1, 2, 4, 5
    no_cache = [type(layer).__name__ == "DummyLayer" for layer in cache.layers]
    assert no_cache == [True, False, False, False, True]
    assert cache.get_seq_length() == 12


@pytest.mark.parametrize("family", ["mamba", "rwkv"])
def test_recurrent_models_refuse_sublayers(family):
    model = editable_model(family)
    with pytest.raises(LayershapError, match="recurrent"):
        keep_sublayers(model, [True] * (2 * N)).__enter__()


def test_keep_dispatches_block_and_sublayer_masks():
    model = sub_model("llama")
    ids = family_ids("llama")
    block = [True, False, True, True, True, True]
    with keep(model, torch.tensor(block).numpy()):
        a = logits(model, ids)
    with keep(model, sub_mask(["attn.1", "mlp.1"])):
        b = logits(model, ids)
    assert torch.equal(a, b)


def test_parameters_and_kv_fraction():
    model = sub_model("llama")
    params = sublayer_parameters(model)
    assert len(params) == 2 * N
    assert params.sum() == block_parameters(model)  # Llama: every parameter of a block is in one sublayer
    assert params[0] < params[1]
    assert kv_cache_fraction_removed(sub_mask()) == pytest.approx(3 / N)
    with pytest.raises(LayershapError):
        parse_sublayer("ffn.1", N)


def test_post_norm_opt_is_refused():
    config = TINY_CONFIGS["opt"]()
    config.do_layer_norm_before = False
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(LayershapError, match="do_layer_norm_before"):
        keep_sublayers(model, [True] * (2 * N)).__enter__()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2", "opt", "gpt_neox"])
def test_saved_sublayer_model_loads_with_remote_code_and_equals_skipping(family, tmp_path):
    import json

    from layershap.models.save import save_pruned
    from layershap.models.save_sublayers import MODELING_FILE
    from layershap.models.sublayers import remove_sublayers

    model = sub_model(family)
    ids = family_ids(family)
    with keep_sublayers(model, sub_mask()):
        skipped = logits(model, ids)
        skipped_gen = generated_logits(model, ids[:, :12], True)
    pruned = remove_sublayers(copy.deepcopy(model), sub_mask())
    assert torch.equal(logits(pruned, ids), skipped)
    out = save_pruned(pruned, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["layershap_removed_sublayers"] == ["attn.0", "mlp.2", "attn.4"]
    assert (out / MODELING_FILE).is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(reloaded).__module__.endswith("modeling_layershap")
    assert torch.equal(logits(reloaded, ids), skipped)
    assert torch.equal(generated_logits(reloaded, ids[:, :12], True), skipped_gen)
    assert torch.equal(generated_logits(reloaded, ids[:, :12], False),
                       generated_logits(zeroing_reference(model), ids[:, :12], False))
    kept = sum(p.numel() for p in reloaded.parameters())
    assert kept == sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_whole_block_sublayer_plan_saves_as_plain_transformers(tmp_path):
    from layershap.models.save import save_pruned
    from layershap.models.save_sublayers import MODELING_FILE
    from layershap.models.sublayers import remove_sublayers

    model = sub_model("llama")
    pruned = remove_sublayers(copy.deepcopy(model), sub_mask(["attn.1", "mlp.1"]))
    out = save_pruned(pruned, None, tmp_path / "out")
    assert not (out / MODELING_FILE).exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == N - 1
