"""The GPU check of streaming (issue 25), for one lent H200, in under 10 minutes: prints one JSON object.

1. A Llama-3-8B-shaped bfloat16 `prune` at the default budget (loaded whole: 16 GB fits): wall time end to
   end, peak GPU memory, masks per second.
2. A Llama-3-70B-shaped streamed estimate (141 GB in bfloat16: more than the GPU and the host hold, so the
   memory check streams it from the checkpoint): seconds per full-size pass, seconds per mask of a 64-mask
   sweep, peak GPU and host memory, and the extrapolated time of the default budget (160 masks).

The checkpoints are sparse files of zeros (layershap/models/shaped.py), written in seconds; they measure time
and memory, not choices. Each part runs in its own process so its peaks are its own.

    python benchmarks/gpu_check.py                 # both parts
    python benchmarks/gpu_check.py --part 70b      # one
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MASKS = 160  # about the default budget of 128 full-size passes at a quarter removed


def part_8b(work: Path) -> dict:
    import torch

    from layershap.cli.app import main as cli
    from layershap.models.shaped import write_shaped_checkpoint

    model = work / "llama-3-8b"
    write_shaped_checkpoint(model, "llama-3-8b")
    out = work / "pruned-8b"
    started = time.perf_counter()
    try:
        cli(["prune", "-m", str(model), "--ratio", "0.25", "--device", "cuda", "--out", str(out),
             "--store", str(work / "store-8b.sqlite")])
    except SystemExit as exit_info:
        if exit_info.code:
            return {"error": f"prune exited {exit_info.code}"}
    wall = time.perf_counter() - started
    record = json.loads((out / "layershap.json").read_text())
    return {"part": "llama-3-8b bf16 prune, default budget", "wall_s": round(wall, 1),
            "choose_s": round(record["seconds"], 1), "forward_passes": record["forward_passes"],
            "masks_per_s": round(record["forward_passes"] / record["seconds"], 2),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "peak_host_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}


def part_70b(work: Path, masks: int) -> dict:
    import numpy as np
    import torch

    import layershap
    from layershap.game.layer_game import LayerGame
    from layershap.models.shaped import write_shaped_checkpoint
    from layershap.models.stream import streamer_of

    model_dir = work / "llama-3-70b"
    write_shaped_checkpoint(model_dir, "llama-3-70b")
    started = time.perf_counter()
    model, _ = layershap.load_model(str(model_dir), device="cuda", batch_size=8, seq_len=128)
    load_s = time.perf_counter() - started
    streamer = streamer_of(model)
    tokens = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0))
    game = LayerGame(model, tokens, batch_size=8)
    n = len(streamer.blocks) if streamer else model.config.num_hidden_layers
    started = time.perf_counter()
    list(game.measure(np.ones((1, n), dtype=bool)))
    torch.cuda.synchronize()
    full_pass_s = time.perf_counter() - started
    batch = np.random.default_rng(0).random((masks, n)) > 0.25
    started = time.perf_counter()
    list(game.measure(batch))
    torch.cuda.synchronize()
    sweep_s = time.perf_counter() - started
    return {"part": "llama-3-70b bf16 streamed estimate", "streamed": streamer is not None,
            "offload": getattr(streamer, "offload", None), "load_s": round(load_s, 1),
            "full_pass_s": round(full_pass_s, 1), "sweep_masks": masks, "sweep_s": round(sweep_s, 1),
            "s_per_mask_in_sweep": round(sweep_s / masks, 2),
            # as if every `masks` masks brought the weights in again (the estimate sweeps larger chunks)
            "projected_default_budget_s": round(sweep_s * DEFAULT_MASKS / masks, 1),
            "block_loads": streamer.loads if streamer else None,
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "peak_host_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["8b", "70b", "all"], default="all")
    parser.add_argument("--work", default=None)
    parser.add_argument("--masks", type=int, default=64)
    parser.add_argument("--timeout", type=int, default=280, help="seconds per part")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="layershap-gpu-"))
    if args.part == "8b":
        print(json.dumps(part_8b(work)))
        return
    if args.part == "70b":
        print(json.dumps(part_70b(work, args.masks)))
        return
    results = []
    for part in ("8b", "70b"):
        try:
            done = subprocess.run([sys.executable, __file__, "--part", part, "--work", str(work), "--masks",
                                   str(args.masks)], capture_output=True, text=True, timeout=args.timeout,
                                  check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {"part": part, "error": done.stderr[-800:]})
        except subprocess.TimeoutExpired:
            results.append({"part": part, "error": f"over {args.timeout} s"})
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"gpu_check": results}, indent=2))


if __name__ == "__main__":
    main()
