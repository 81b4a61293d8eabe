"""Write a sublayer-pruned Llama or Mistral as a Nemotron-NAS (`DeciLMForCausalLM`) checkpoint, the layout
vLLM's `nemotron_nas` model serves.

What vLLM's loader reads (vllm/model_executor/models/nemotron_nas.py, checked by reading it; vLLM does not
run here):
- `config.block_configs[i].attention.no_op` / `.ffn.no_op`: a block without that sublayer, which then has no
  `self_attn`/`input_layernorm` (or `mlp`/`post_attention_layernorm`) module, so its checkpoint must have no
  such tensors; `attention.n_heads_in_group` gives its KV heads (`num_attention_heads // n_heads_in_group`);
  `ffn.ffn_mult` (rounded up to a multiple of 256 from `2 * ffn_mult * hidden / 3`), or, when the block's
  `ffn` has no `ffn_mult` attribute, `ffn.intermediate_size`: the MLP width. `ffn_mult` is written only where
  that rounding gives the width back exactly; otherwise only `intermediate_size`.
- weights under Llama's names (`model.layers.i.self_attn.q_proj.weight`, `...mlp.gate_proj.weight`,
  `model.embed_tokens`, `model.norm`, `lm_head`), the blocks' modules being vLLM's Llama attention and MLP
  (RMSNorm, SiLU-gated MLP, neox-style RoPE from the config's rope parameters, `attention_bias`/`mlp_bias`).
- a block whose attention is a no-op passes `(hidden, residual)` on unchanged and its FFN does the fused
  residual add; but the first block has no residual yet (None), and vLLM's RMSNorm then returns a tensor,
  not the pair the layer unpacks. So a plan that drops the first kept block's attention and keeps its MLP is
  written with that attention kept, all zero, with one KV head (`n_heads_in_group = num_attention_heads`):
  it adds exactly 0, at the cost of its zero weights and one KV head of cache in that block.

So the Llama family maps exactly: `llama`, and `mistral` without a sliding window (DeciLM's attention has
none). Other families (biases on q/k/v only, q/k norms, other MLPs, sliding windows) are refused in one line.
The config class is not in transformers, so the directory ships `modeling_layershap_decilm.py` (config and
model); vLLM needs --trust-remote-code for the config class, transformers trust_remote_code for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from layershap.errors import LayershapError
from layershap.io import write_json
from layershap.models.card import write_model_card
from layershap.models.save_sublayers import DECI_FILE, decilm_source
from layershap.models.sublayers import REMOVED_KEY

FAMILIES = ("llama", "mistral")
_DROP_KEYS = (REMOVED_KEY, "layershap_sublayers", "kv_sharing_modes", "auto_map", "sliding_window",
              "use_sliding_window", "max_window_layers", "layer_types")


def check_decilm(model) -> None:
    """Refuse, in one line, a model whose blocks DeciLM cannot express exactly."""
    config = model.config
    kind = config.model_type
    if kind not in FAMILIES:
        raise LayershapError(f"--format decilm writes Llama-family blocks ({', '.join(FAMILIES)}); this is a "
                             f"{kind} model. Give an --out directory without --format decilm")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < getattr(config, "max_position_embeddings", 0):
        raise LayershapError(f"this {kind} model attends through a sliding window of {window} tokens, which "
                             "DeciLM's attention does not have; give an --out directory without --format decilm")


def ffn_mult_for(width: int, hidden: int) -> float | None:
    """The `ffn_mult` that DeciLM's rounding turns back into `width`, or None when none does exactly."""
    mult = 3 * width / (2 * hidden)
    size = int(2 * mult * hidden / 3)
    size = size if size % 256 == 0 else size + 256 - size % 256
    return mult if size == width else None


def block_configs(config, removed: list[str], n: int) -> list[dict]:
    """One entry per kept block, from `removed` (attn.i / mlp.i by new block position)."""
    gone = set(removed)
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    mult = ffn_mult_for(config.intermediate_size, config.hidden_size)
    out = []
    for i in range(n):
        attn_gone, mlp_gone = f"attn.{i}" in gone, f"mlp.{i}" in gone
        zero_attention = i == 0 and attn_gone and not mlp_gone
        attention = {"no_op": attn_gone and not zero_attention, "replace_with_linear": False,
                     "n_heads_in_group": None if attn_gone and not zero_attention
                     else heads if zero_attention else heads // kv}
        ffn = {"no_op": mlp_gone, "replace_with_linear": False}
        if mlp_gone:
            ffn["ffn_mult"] = None  # as NVIDIA's checkpoints write a no-op FFN (llama.cpp's converter reads it)
        else:
            ffn["intermediate_size"] = config.intermediate_size
            if mult is not None:
                ffn["ffn_mult"] = mult
        out.append({"attention": attention, "ffn": ffn})
    return out


def save_decilm(model, tokenizer, out_dir, record: dict | None = None) -> dict:
    """Write the sublayer-pruned `model` (as `sublayers.remove_sublayers` left it) as a DeciLM directory;
    return what was written (block layout, zero attention, tensors)."""
    from layershap.models.save import saved_dtype

    check_decilm(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    n = config.num_hidden_layers
    removed = list(getattr(config, REMOVED_KEY, None) or [])
    blocks = block_configs(config, removed, n)
    dtype = saved_dtype(model)
    state = {name: t.to(dtype) if dtype is not None and t.is_floating_point() else t
             for name, t in model.state_dict().items()}
    zero_attention = blocks and blocks[0]["attention"]["n_heads_in_group"] == config.num_attention_heads \
        and "attn.0" in removed
    if zero_attention:
        state.update(_zero_attention(config, next(iter(state.values())).dtype))
    model.save_pretrained(out, state_dict=state)
    path = out / "config.json"
    saved = json.loads(path.read_text())
    for key in _DROP_KEYS:
        saved.pop(key, None)
    saved.update({"model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"], "block_configs": blocks,
                  "auto_map": {"AutoConfig": f"{DECI_FILE[:-3]}.DeciLMConfig",
                               "AutoModelForCausalLM": f"{DECI_FILE[:-3]}.DeciLMForCausalLM"}})
    if dtype is not None:
        saved["dtype"] = str(dtype).removeprefix("torch.")
    write_json(path, saved)
    (out / DECI_FILE).write_text(decilm_source())
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    info = {"format": "decilm", "blocks": n, "no_op_attention": [i for i, b in enumerate(blocks)
                                                                 if b["attention"]["no_op"]],
            "no_op_ffn": [i for i, b in enumerate(blocks) if b["ffn"]["no_op"]],
            "zero_attention_blocks": [0] if zero_attention else [], "tensors": len(state)}
    if record is not None:
        record["decilm"] = info
        write_json(out / "layershap.json", record)
        write_model_card(out, record)
    return info


def _zero_attention(config, dtype) -> dict[str, torch.Tensor]:
    """Block 0's kept-but-zero attention with one KV head (see the module doc), and its norm."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    prefix = "model.layers.0."
    shapes = {"self_attn.q_proj.weight": (q, config.hidden_size), "self_attn.k_proj.weight": (head_dim, config.hidden_size),
              "self_attn.v_proj.weight": (head_dim, config.hidden_size), "self_attn.o_proj.weight": (config.hidden_size, q)}
    if getattr(config, "attention_bias", False):
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (head_dim,),
                       "self_attn.v_proj.bias": (head_dim,), "self_attn.o_proj.bias": (config.hidden_size,)})
    tensors = {prefix + name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
    tensors[prefix + "input_layernorm.weight"] = torch.ones(config.hidden_size, dtype=dtype)
    return tensors
