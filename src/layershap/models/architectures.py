"""Where each model family keeps its blocks, and what must follow them when blocks are skipped or removed.

Skipping and removing are the same edit (a shorter block list with a consistent config), so everything that
differs between families lives in this one table. Adding a family is one `register(...)` line; the tests in
`tests/test_architectures.py` then check it skips exactly, saves and reloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layershap.errors import LayershapError


@dataclass(frozen=True)
class Sublayer:
    """One residual branch of a block, `h + after(module(before(h)))`, by submodule names inside the block.

    module: the submodule whose output is added to the residual stream; a skipped one is replaced by a module
        that runs nothing and returns a zero scalar (so the residual sum passes the stream through exactly).
    before, after: submodules that only this branch runs (its norms, OPT's fc1 and activation); replaced by
        identities when the branch is skipped. Norms shared with the other branch are not listed.
    returns_tuple: whether `module` returns `(output, weights)` (attention) or a tensor (MLP).
    """

    module: str
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    returns_tuple: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.before, self.module, *self.after)


def _sublayers(attn: str = "self_attn", attn_before=("input_layernorm",), attn_after=(), mlp: str = "mlp",
               mlp_before=("post_attention_layernorm",), mlp_after=()) -> dict:
    return {"attention": Sublayer(attn, tuple(attn_before), tuple(attn_after), returns_tuple=True),
            "mlp": Sublayer(mlp, tuple(mlp_before), tuple(mlp_after))}


@dataclass(frozen=True)
class Architecture:
    """How one model family stores its stack of blocks.

    blocks: dotted path from the `...ForCausalLM` object to the `nn.ModuleList` of blocks.
    index_attrs: integer attributes inside a block that hold its position (the KV cache, and RWKV's state
        and its `pre_ln` switch, read them), renumbered to the new position.
    per_layer_config: config lists with one entry per block, sliced with the kept blocks (Qwen2 and Gemma
        choose masks and RoPE by position from `layer_types`). Read-only ones (Mamba's `layer_types` is a
        property derived from the layer count) are left alone.
    boundary_config: config values that are a block index splitting the stack in two (Qwen2's
        `max_window_layers`: blocks before it use full attention, the rest a sliding window), recounted over
        the kept blocks, so that a loader that derives `layer_types` from them (older transformers) agrees.
    first_block_modules: submodules that only the first block owns but that act on the stack's input
        (RWKV's `pre_ln` normalises the embeddings, and a block runs it when its index is 0); when the
        first block is skipped or removed they move to the new first block, so the checkpoint keeps them.
    save_config: config values a model must have before its blocks can be skipped or removed, and that a
        pruned checkpoint carries. `load_model` sets them right after loading; `keep_only`, `prune_layers`
        and `save_pruned` refuse a model that lacks them. RWKV with `rescale_every > 0` divides its weights
        in place by a power of two of each block's position on its first inference pass and halves the
        hidden state by position, so a shorter stack would be scaled for the wrong positions.
    kind: "transformer" or "recurrent"; recurrent models have no attention.
    attention, mlp: where a block keeps its attention and its MLP sublayer (`Sublayer`), for the sublayer
        game (`--granularity sublayer`, `models/sublayers.py`); None where a family's sublayers cannot be
        skipped by passing the residual stream through (recurrent blocks, families not yet described).
    sublayer_config: config values a model must have for its sublayers to be skippable (OPT with
        `do_layer_norm_before = False` is post-norm: a norm after each residual sum, which skipping the
        sublayer would still have to run).
    prefix_sharing: whether a cached hidden state may be fed to any block as its input (see
        `game/prefix.py`); not for RWKV, whose first block also normalises what it is given.
    """

    name: str
    blocks: str
    index_attrs: tuple[str, ...] = ("layer_idx",)
    per_layer_config: tuple[str, ...] = ("layer_types",)
    boundary_config: tuple[str, ...] = ()
    first_block_modules: tuple[str, ...] = ()
    save_config: dict = field(default_factory=dict)
    kind: str = "transformer"
    prefix_sharing: bool = True
    attention: Sublayer | None = None
    mlp: Sublayer | None = None
    sublayer_config: dict = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {}


def register(model_type: str, arch: Architecture) -> None:
    ARCHITECTURES[model_type] = arch


_LLAMA_LIKE = _sublayers()  # h += attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h))
_SUBLAYERS = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "granite", "smollm3",
                                "starcoder2")},
    # norms on both sides of each branch: h += post(attn(pre(h)))
    "gemma2": _sublayers(attn_after=("post_attention_layernorm",), mlp_before=("pre_feedforward_layernorm",),
                         mlp_after=("post_feedforward_layernorm",)),
    "gemma3_text": _sublayers(attn_after=("post_attention_layernorm",), mlp_before=("pre_feedforward_layernorm",),
                              mlp_after=("post_feedforward_layernorm",)),
    # norms after each branch only: h += post_attention_layernorm(attn(h))
    "olmo2": _sublayers(attn_before=(), attn_after=("post_attention_layernorm",), mlp_before=(),
                        mlp_after=("post_feedforward_layernorm",)),
    # the residual dropouts stay: on a zero they are a zero
    "phi3": _LLAMA_LIKE,
}
for _type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2",
              "granite", "smollm3", "cohere", "starcoder2", "qwen3_moe", "qwen2_moe", "mixtral", "phi"):
    register(_type, Architecture(_type, "model.layers",
                                 per_layer_config=("layer_types", "no_rope_layers", "mlp_only_layers"),
                                 boundary_config=("max_window_layers",), **_SUBLAYERS.get(_type, {})))
# A Nemotron-NAS checkpoint as layershap writes it (`--format decilm`, models/save_decilm.py): Llama blocks, some
# without their attention or MLP, each described by one `block_configs` entry (kept in step when blocks go)
register("nemotron-nas", Architecture("nemotron-nas", "model.layers",
                                      per_layer_config=("layer_types", "block_configs", "kv_sharing_modes"),
                                      **_LLAMA_LIKE))
register("gpt2", Architecture("gpt2", "transformer.h", **_sublayers("attn", ("ln_1",), (), "mlp", ("ln_2",))))
# OPT runs its MLP inline (fc1, activation, fc2): fc2's output is the branch; pre-norm OPT only
register("opt", Architecture("opt", "model.decoder.layers",
                             **_sublayers("self_attn", ("self_attn_layer_norm",), (), "fc2",
                                          ("final_layer_norm", "fc1", "activation_fn")),
                             sublayer_config={"do_layer_norm_before": True}))
# GPT-NeoX with use_parallel_residual adds both branches to the block's input, h + attn(ln1(h)) + mlp(ln2(h)):
# there a sublayer is one of the two parallel branches, and skipping it leaves h + the other branch.
register("gpt_neox", Architecture("gpt_neox", "gpt_neox.layers",
                                  **_sublayers("attention", ("input_layernorm",), ("post_attention_dropout",),
                                               "mlp", ("post_attention_layernorm",), ("post_mlp_dropout",))))
register("mamba", Architecture("mamba", "backbone.layers", kind="recurrent"))
register("mamba2", Architecture("mamba2", "backbone.layers", kind="recurrent"))
register("rwkv", Architecture("rwkv", "rwkv.blocks", index_attrs=("layer_id",), first_block_modules=("pre_ln",), prefix_sharing=False,
                              save_config={"rescale_every": 0}, kind="recurrent"))


def supported_types() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture_for_type(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise LayershapError(
            f"model type {model_type!r} is not supported; supported: {', '.join(supported_types())}. "
            "To add one, register where its blocks live in layershap/models/architectures.py"
        ) from None


def architecture_of(model) -> Architecture:
    """The registry entry for a loaded model (by `config.model_type`)."""
    return architecture_for_type(model.config.model_type)
