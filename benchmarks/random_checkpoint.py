"""Write a checkpoint of Llama-2-7B's shape with random weights, in bfloat16, for end-to-end runs on a GPU
machine that has no weights and no hub (docs/benchmarks.md, "On a GPU").

The tokenizer is the embedded default's (SmolLM2's, vocabulary 49,152, so the model's vocabulary is that size
too: 6.88 B parameters); `--tokenizer DIR` takes another one's.

    python benchmarks/random_checkpoint.py /tmp/llama7b --device cuda
    layershap prune -m /tmp/llama7b --ratio 0.25 --out /tmp/pruned --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from layershap.models.load import default_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--tokenizer", default=None, help="directory with a tokenizer; default: the embedded model's")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_dir())
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=len(tokenizer),
                         max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters written to {args.out} "
          f"in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
