"""Tiny random models of every supported family, built from a config (no download), for fast exact tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 320
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8,
                                              max_window_layers=3),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=8, sliding_window=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=8),
    "phi3": lambda: transformers.Phi3Config(**COMMON, pad_token_id=0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4, n_positions=256),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=6,
                                          num_attention_heads=4, max_position_embeddings=256,
                                          word_embed_proj_dim=32),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=6, num_attention_heads=4,
                                                   max_position_embeddings=256),
    "mamba": lambda: transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8,
                                              num_hidden_layers=6, expand=2, conv_kernel=4),
    "mamba2": lambda: transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8,
                                                num_hidden_layers=6, expand=2, conv_kernel=4, head_dim=8,
                                                num_heads=8, n_groups=1, chunk_size=16),
    "rwkv": lambda: transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32, attention_hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=6, context_length=256,
                                            rescale_every=2),
}


def tiny_model(model_type: str = "llama", seed: int = 0):
    """A randomly initialised causal LM of the given family, in float32 eval mode."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init leaves some families (RWKV, Mamba) with near-identity blocks; larger weights make a
    # skipped block change the output visibly, so exactness tests can fail.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()
