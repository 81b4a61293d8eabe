"""Write a checkpoint of a real model's shape whose weights are a sparse file (zeros, no disk), for memory and
speed runs at 8B-70B on any machine (layershap/models/shaped.py says why zeros).

    python benchmarks/shaped_checkpoint.py llama-3-8b /tmp/llama3-8b
    layershap ppl -m /tmp/llama3-8b --samples 2 --seq-len 64
"""

from __future__ import annotations

import argparse
import json

import torch

from layershap.models.shaped import SHAPES, disk_usage, write_shaped_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks than the real model")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    summary = write_shaped_checkpoint(args.out, args.shape, num_hidden_layers=args.layers,
                                      dtype=getattr(torch, args.dtype))
    summary["disk_bytes"] = disk_usage(args.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
