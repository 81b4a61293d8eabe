"""Tiny GGUF files for tests: a tiny random transformers model written with llama.cpp's tensor names and the
config keys transformers reads back, its 2-D weights in Q8_0 where the row length allows (so the files hold
real quantized blocks), plus a byte-level tokenizer. Not a converter for real use: only what transformers
needs to load the file again, for the families the GGUF export supports."""

from __future__ import annotations

import json

import numpy as np

# transformers model type -> llama.cpp architecture name
GGUF_ARCH = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def write_tiny_gguf(model, path, *, tokenizer=None, quantize: bool = True, extra_keys=None, arch: str | None = None):
    """Write `model` (a tiny transformers causal LM) to the GGUF file `path`; return the path."""
    import gguf
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    config = model.config
    gguf_arch = arch or GGUF_ARCH.get(config.model_type, config.model_type)
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_string("general.name", f"tiny-{config.model_type}")
    mapping = GGUF_CONFIG_MAPPING.get(config.model_type.removesuffix("_text"), {})
    for key, attr in mapping.items():
        value = getattr(config, attr, None) if attr else None
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            writer.add_uint32(f"{gguf_arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{gguf_arch}.{key}", value)
    for key, (value, vtype) in (extra_keys or {}).items():
        writer.add_key_value(key, value, vtype[0], vtype[1] if len(vtype) > 1 else None)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    names = get_gguf_hf_weights_map(model, TensorProcessor())
    state = model.state_dict()
    for gguf_name, hf_name in sorted(names.items()):
        if hf_name not in state:
            continue
        if config.tie_word_embeddings and gguf_name == "output.weight":
            continue  # transformers ties the head to the embedding when the file has no output.weight
        weights = _to_gguf(gguf_arch, gguf_name, state[hf_name].detach().float().numpy())
        if quantize and weights.ndim == 2 and weights.shape[-1] % 32 == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(weights, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _to_gguf(arch: str, name: str, weights: np.ndarray) -> np.ndarray:
    """Undo what transformers' tensor processor does on reading (so the file loads with the right shapes)."""
    if arch in ("gemma2", "gemma3") and "norm.weight" in name:
        return weights + 1
    if arch == "mamba" and "ssm_conv1d.weight" in name:
        return weights.squeeze(1)
    if arch == "mamba" and "ssm_a" in name:
        return -np.exp(weights)
    if arch == "gpt2" and any(part in name for part in ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight",
                                                          "attn_output.weight")):
        return weights.T.copy()
    return weights


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    if tokenizer is None:
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(vocab_size)])
        for key in ("bos", "eos", "padding"):
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", 0)
        return
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [3 if t in special else 1 for t in tokens])
    writer.add_array("tokenizer.ggml.merges", merges)
    for key in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id")
        if token_id is not None:
            writer.add_uint32(f"tokenizer.ggml.{'padding' if key == 'pad' else key}_token_id", token_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
