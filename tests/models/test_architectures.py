"""Every registered family skips blocks exactly, removes them exactly, and saves checkpoints plain transformers runs.

Each tiny model (tests/tiny_models.py) is checked against four things that must agree to the last bit:
skipping (`keep_only`), removal (`prune_layers`), the saved and reloaded checkpoint (plain transformers,
no layershap), and a reference built without layershap: a fresh model of the shorter length, with the
expected per-block `layer_types`, loaded with the kept blocks' weights under their new indices. The inputs
are longer than the sliding window (8) and the masks move sliding and global layers to other positions, so a
config list that is not sliced, or a block position that is not renumbered, changes the logits.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers
from tiny_models import TINY_CONFIGS, VOCAB, tiny_model

import layershap
from layershap.errors import LayershapError
from layershap.models.architectures import architecture_of, supported_types
from layershap.models.layers import block_list, keep_only, num_layers, prune_layers
from layershap.models.save import save_pruned

FAMILIES = list(TINY_CONFIGS)
RECURRENT = {"mamba", "mamba2", "rwkv"}
N = 6
# Interior blocks, and the first and last: both change which layer types sit where (Qwen2 with
# max_window_layers=3 is full x3 + sliding x3; Gemma2 alternates; Gemma3 has its global layer last).
REMOVALS = [(1, 4), (0, 5)]
SEQ = 20  # longer than the tiny configs' sliding_window of 8
INDEX_ATTRS = ("layer_idx", "layer_id")



def editable_model(family: str):
    """A tiny model with its family's required config values set before any forward pass, as load_model does
    (only RWKV has one: rescale_every=0)."""
    model = tiny_model(family)
    for key, value in architecture_of(model).save_config.items():
        setattr(model.config, key, value)
    return model


def input_ids(family: str, length: int = SEQ) -> torch.Tensor:
    # Upstream RWKV's stateful generation is wrong for batch > 1, so RWKV runs with one row.
    batch = 1 if family == "rwkv" else 2
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits


def keep_mask(remove) -> list[bool]:
    return [i not in remove for i in range(N)]


def layer_types(config):
    types = getattr(config, "layer_types", None)
    return list(types) if types is not None else None


def reference_removal(model, kept: list[int]):
    """The shorter model built by transformers itself: a fresh model of len(kept) blocks whose config says
    which layer type each new position has, loaded with the kept blocks' weights renamed to their new indices.
    Uses nothing of layershap but the registry's path to the blocks."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)  # GPT-2 maps this to n_layer
    types = layer_types(model.config)
    if types is not None and not isinstance(getattr(type(config), "layer_types", None), property):
        config.layer_types = [types[i] for i in kept]
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()

    prefix = architecture_of(model).blocks
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)")
    new_index = {old: new for new, old in enumerate(kept)}
    source = model.state_dict()
    state = {}
    for key, value in source.items():
        match = pattern.fullmatch(key)
        if match is None:
            state[key] = value
        elif int(match[1]) in new_index:
            state[f"{prefix}.{new_index[int(match[1])]}.{match[2]}"] = value
    for key in ref.state_dict():
        # What the new first block has that the kept one lacked (RWKV's `pre_ln`, which normalises the
        # embeddings) is the stack's input normalisation: it stays with position 0.
        state.setdefault(key, source[key])
    ref.load_state_dict(state, strict=True)
    return ref


def snapshot(model) -> dict:
    """Everything keep_only may touch: block list object, config, block positions, parameter names."""
    blocks = block_list(model)
    return {
        "blocks": blocks,
        "members": list(blocks),
        "config": model.config.to_dict(),
        "count": model.config.num_hidden_layers,
        "layer_types": layer_types(model.config),
        "index": {(name, attr): getattr(module, attr) for name, module in model.named_modules()
                  for attr in INDEX_ATTRS if isinstance(getattr(module, attr, None), int)},
        "params": sorted(model.state_dict()),
    }


def assert_restored(model, before: dict) -> None:
    after = snapshot(model)
    assert after["blocks"] is before["blocks"]
    assert after["members"] == before["members"]
    for key in ("config", "count", "layer_types", "index", "params"):
        assert after[key] == before[key], key


def generation_config(**extra):
    return transformers.GenerationConfig(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                         bos_token_id=None, eos_token_id=None, **extra)


@torch.no_grad()
def generate(model, ids, use_cache: bool) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids),
                          generation_config=generation_config(use_cache=use_cache))


# 1. skipping == removal == saved and reloaded == reference ----------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_equals_removal_reload_and_reference(family, tmp_path):
    model = editable_model(family)
    ids = input_ids(family)
    full = logits(model, ids)
    for remove in REMOVALS:
        kept = [i for i in range(N) if i not in remove]
        with keep_only(model, keep_mask(remove)):
            skipped = logits(model, ids)
        assert (skipped - full).abs().max() > 1e-2, "the dropped blocks should matter"
        torch.testing.assert_close(skipped, logits(reference_removal(model, kept), ids), rtol=0, atol=0)

        pruned = prune_layers(copy.deepcopy(model), remove=list(remove))
        torch.testing.assert_close(skipped, logits(pruned, ids), rtol=0, atol=0)
        out = save_pruned(pruned, None, tmp_path / f"pruned-{remove[0]}-{remove[1]}")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(skipped, logits(reloaded, ids), rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), full, rtol=0, atol=0)


# 2. keep_only restores the model, also after an exception ---------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_keep_only_restores_the_model(family):
    model = editable_model(family)
    ids = input_ids(family, 12)
    before = snapshot(model)
    full = logits(model, ids)

    for remove in REMOVALS:
        with keep_only(model, keep_mask(remove)):
            logits(model, ids)
            inside = snapshot(model)
            assert len(inside["members"]) == N - 2 and inside["count"] == N - 2
            assert sorted({pos for pos in inside["index"].values()}) == list(range(N - 2))
        assert_restored(model, before)

    with pytest.raises(RuntimeError, match="boom"), keep_only(model, [0, 2, 3]):
        logits(model, ids)
        raise RuntimeError("boom")
    assert_restored(model, before)
    torch.testing.assert_close(logits(model, ids), full, rtol=0, atol=0)


# 3. skipped blocks do not run ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_blocks_are_not_run(family):
    model = editable_model(family)
    blocks = list(block_list(model))
    calls = [0] * N
    handles = [block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(blocks)]
    try:
        with keep_only(model, keep_mask((1, 4))):
            logits(model, input_ids(family, 12))
        assert calls == [1, 0, 1, 1, 0, 1]
        logits(model, input_ids(family, 12))
        assert calls == [2, 1, 2, 2, 1, 2]
    finally:
        for handle in handles:
            handle.remove()


# 4. the saved checkpoint: config, and generation with the cache ---------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_config_and_generation(family, tmp_path):
    remove = (1, 4)
    kept = [i for i in range(N) if i not in remove]
    model = editable_model(family)
    pruned = prune_layers(copy.deepcopy(model), remove=list(remove))
    out = save_pruned(pruned, None, tmp_path / "pruned")

    raw = json.loads((out / "config.json").read_text())
    assert raw.get("num_hidden_layers", raw.get("n_layer")) == len(kept)
    types = layer_types(model.config)
    if "layer_types" in raw:
        assert raw["layer_types"] == [types[i] for i in kept]
    if family == "rwkv":
        assert raw["rescale_every"] == 0
    if family == "qwen2":
        # max_window_layers (3: full, full, full, sliding x3) is recounted over the kept blocks, so a loader
        # that derives layer_types from it instead of reading them gets the same (older transformers do).
        assert raw["max_window_layers"] == 2
        derived = type(model.config).from_dict({k: v for k, v in raw.items() if k != "layer_types"})
        assert derived.layer_types == raw["layer_types"]

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == len(kept)
    assert num_layers(reloaded) == len(kept)
    if types is not None:
        assert layer_types(reloaded.config) == [types[i] for i in kept]

    prompt = input_ids(family, 12)  # 12 prompt + 8 new tokens run past the sliding window of 8
    cached = generate(reloaded, prompt, use_cache=True)
    assert cached.shape == (prompt.shape[0], prompt.shape[1] + 8)
    with keep_only(model, keep_mask(remove)):
        skipped = generate(model, prompt, use_cache=True)
    assert torch.equal(cached, skipped)
    if family in RECURRENT:
        assert torch.equal(cached, generate(pruned, prompt, use_cache=True))
    else:
        assert torch.equal(cached, generate(reloaded, prompt, use_cache=False))


# 5. unsupported architectures ----------------------------------------------------------------------------------

def tiny_bert_lm():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, is_decoder=True)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_unsupported_architecture_is_named_with_the_fix(tmp_path):
    model = tiny_bert_lm()
    for call in (lambda: keep_only(model, [True, False]).__enter__(), lambda: prune_layers(model, [0]),
                 lambda: num_layers(model), lambda: save_pruned(model, None, tmp_path / "out")):
        with pytest.raises(LayershapError) as info:
            call()
        message = str(info.value)
        assert "'bert'" in message
        assert all(t in message for t in supported_types())
        assert "architectures.py" in message and "register" in message
    assert len(model.bert.encoder.layer) == 2

    model.config.save_pretrained(tmp_path / "bert")
    with pytest.raises(LayershapError, match="'bert' is not supported"):
        layershap.load_model(str(tmp_path / "bert"), device="cpu")


# 6. prune_layers' index handling -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_prune_layers_indices(family):
    model = editable_model(family)
    blocks = list(block_list(model))

    for remove in (list(range(N)), [-1, -2, -3, -4, -5, -6], [0, 1, 2, 3, 4, 5, -1]):
        with pytest.raises(LayershapError, match="cannot remove all"):
            prune_layers(model, remove)
    for remove in ([N], [-N - 1], [0, 100]):
        with pytest.raises(LayershapError, match="does not exist"):
            prune_layers(model, remove)
    assert list(block_list(model)) == blocks and model.config.num_hidden_layers == N

    prune_layers(model, [-1, 0, 5])  # -1 is the last block; naming it twice removes it once
    assert list(block_list(model)) == blocks[1:5]
    assert model.config.num_hidden_layers == 4
    positions = [getattr(m, attr) for b in block_list(model) for m in b.modules() for attr in INDEX_ATTRS
                 if isinstance(getattr(m, attr, None), int)]
    assert positions and sorted(set(positions)) == [0, 1, 2, 3]


def test_keep_only_rejects_bad_masks():
    model = editable_model("llama")
    with pytest.raises(LayershapError, match="needs 6 entries"):
        keep_only(model, [True] * 5).__enter__()
    with pytest.raises(LayershapError, match="0..5"):
        keep_only(model, [0, 6]).__enter__()
    blocks = block_list(model)
    with keep_only(model, [True] * N):
        assert block_list(model) is blocks


# RWKV's in-place rescaling --------------------------------------------------------------------------------------

def test_rwkv_with_rescaling_on_is_refused():
    """With rescale_every > 0, RWKV divides block i's output weights by 2**(i // rescale_every) on its first
    inference pass and halves the hidden state after every rescale_every-th block: a shorter stack would be
    scaled for the wrong positions (and a checkpoint saved after a forward pass holds scaled weights). So
    layershap refuses such a model and says how to turn rescaling off; load_model does it on load."""
    model = tiny_model("rwkv")
    assert model.config.rescale_every == 2
    logits(model, input_ids("rwkv", 12))  # the weights are now rescaled in place
    for call in (lambda: keep_only(model, keep_mask((1, 4))).__enter__(), lambda: prune_layers(model, [1]),
                 lambda: save_pruned(model, None, "unused")):
        with pytest.raises(LayershapError, match="rescale_every = 2.*layershap.load_model"):
            call()
    assert len(block_list(model)) == N


def test_rwkv_loaded_by_layershap_skips_exactly(tmp_path, tiny_tokenizer):
    original = tiny_model("rwkv")
    original.save_pretrained(tmp_path / "rwkv")
    tiny_tokenizer.save_pretrained(tmp_path / "rwkv")
    model, _ = layershap.load_model(str(tmp_path / "rwkv"), device="cpu")
    assert model.config.rescale_every == 0

    ids = input_ids("rwkv")
    # Rescaling only guards float16 against overflow: turning it off keeps the model's function.
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=2e-3)
    remove = (0, 3)
    with keep_only(model, keep_mask(remove)):
        skipped = logits(model, ids)
    pruned = prune_layers(copy.deepcopy(model), remove=list(remove))
    torch.testing.assert_close(skipped, logits(pruned, ids), rtol=0, atol=0)
    torch.testing.assert_close(skipped, logits(reference_removal(model, [1, 2, 4, 5]), ids), rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_half_precision_checkpoint_is_saved_in_its_own_dtype(tmp_path, tiny_tokenizer, tied):
    """load_model widens a bfloat16 checkpoint to float32 on a CPU; the pruned checkpoint must come back in
    bfloat16 (not at twice the size), hold exactly the pruned weights rounded to bfloat16, and load as
    bfloat16 with plain transformers, while the model in memory stays float32."""
    original = tiny_model("llama")
    original.config.tie_word_embeddings = tied
    original.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tiny_tokenizer.save_pretrained(tmp_path / "bf16")
    model, tokenizer = layershap.load_model(str(tmp_path / "bf16"), device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    prune_layers(model, [1, 4])
    out = save_pruned(model, tokenizer, tmp_path / "pruned")

    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")  # the default from 5.0
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    assert reloaded.config.num_hidden_layers == N - 2
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) < \
        sum(p.stat().st_size for p in (tmp_path / "bf16").glob("*.safetensors"))


def test_float32_checkpoint_is_saved_as_it_is(tmp_path, tiny_tokenizer):
    tiny_model("llama").save_pretrained(tmp_path / "fp32")
    tiny_tokenizer.save_pretrained(tmp_path / "fp32")
    model, tokenizer = layershap.load_model(str(tmp_path / "fp32"), device="cpu")
    out = save_pruned(prune_layers(model, [0]), tokenizer, tmp_path / "pruned")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(reloaded.parameters()).dtype == torch.float32
