"""Streaming on a CPU: a Llama-3-8B-shaped checkpoint through `ppl`, `estimate` and `prune --method shortgpt`
with peak resident memory (/usr/bin/time -v), and streaming against in-memory time per mask on the embedded
default and a Llama-3.2-1B shape (docs/benchmarks.md, "Streaming").

The shaped checkpoints are sparse files of zeros (layershap/models/shaped.py): the figures are what the data
path costs, not what any method chooses.

    python benchmarks/streaming.py --out streaming.json            # everything (about an hour on 2 cores)
    python benchmarks/streaming.py --parts per-mask --out x.json   # only the side-by-side time per mask
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PARTS = ("8b", "per-mask")


def timed(command: list[str]) -> dict:
    """Run a layershap command under /usr/bin/time -v: wall seconds, peak RSS, exit code, its last lines."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "layershap", *command],
                          check=False, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if line.startswith(("layershap", "wiki", "c4", "removed", "saved", "surrogate", "lowest"))]
    return {"command": "layershap " + " ".join(command), "exit": done.returncode, "seconds": round(wall, 1),
            "peak_rss_gb": round(int(peak.group(1)) * 1024 / 1e9, 2) if peak else None, "lines": lines[-6:]}


RUNS = ("ppl", "estimate", "prune_shortgpt")


def eight_b(work: Path, shape: str, runs_wanted=RUNS) -> dict:
    from layershap.models.shaped import disk_usage, write_shaped_checkpoint

    model = work / shape
    summary = write_shaped_checkpoint(model, shape)
    float32_gb = summary["parameters"] * 4 / 1e9
    text = ["--data", "c4", "--samples", "1", "--batch-size", "1"]
    commands = {
        "ppl": ["ppl", "-m", str(model), "--data", "wiki", "--samples", "1", "--seq-len", "32", "--batch-size", "1"],
        # the smallest budget the surrogate accepts for 32 blocks, on one window of 16 tokens
        "estimate": ["estimate", "-m", str(model), "--out", str(work / "estimate"), "--budget", "20",
                     "--store", str(work / "store.sqlite"), "--seq-len", "16", *text],
        "prune_shortgpt": ["prune", "-m", str(model), "--method", "shortgpt", "--ratio", "0.25",
                           "--out", str(work / "pruned"), "--eval-samples", "1", "--eval-seq-len", "32",
                           "--seq-len", "32", *text],
    }
    runs = {name: timed(commands[name]) for name in runs_wanted}
    for run in runs.values():
        run["share_of_float32"] = round(run["peak_rss_gb"] / float32_gb, 3) if run["peak_rss_gb"] else None
    if not (work / "pruned" / "config.json").is_file():
        return {"shape": shape, "runs": runs}
    check = subprocess.run([sys.executable, "-c", (
        "import torch, transformers, sys\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
        "print(m.config.num_hidden_layers, len(m.model.layers))"), str(work / "pruned")],
        check=False, capture_output=True, text=True)
    return {"shape": shape, "parameters": summary["parameters"], "float32_gb": round(float32_gb, 1),
            "checkpoint_disk_bytes": disk_usage(model), "runs": runs,
            "pruned_loads_with_transformers": check.stdout.strip() or check.stderr.strip()[-300:],
            "pruned_disk_bytes": disk_usage(work / "pruned") if (work / "pruned").exists() else None}


def per_mask(name: str | None, label: str, *, masks: int, samples: int, seq_len: int, batch_size: int) -> dict:
    """Seconds per mask of the same masks through the game, loaded whole and streamed from disk."""
    import torch

    import layershap
    from layershap.game.layer_game import LayerGame
    from layershap.game.sweep import BlockSweep
    from layershap.models.layers import num_layers

    out = {"model": label, "masks": masks, "windows": f"{samples} x {seq_len}", "batch_size": batch_size}
    values = {}
    # in memory: the game's prefix sharing, and the sweep alone; streamed: the game (which sweeps)
    for mode, offload in (("in_memory", "none"), ("in_memory_sweep", "none"), ("streamed", "disk")):
        model, _ = layershap.load_model(name, offload=offload, batch_size=batch_size, seq_len=seq_len)
        n = num_layers(model)
        batch = np.random.default_rng(0).random((masks, n)) > 0.25
        tokens = torch.randint(0, 49152, (samples, seq_len), generator=torch.Generator().manual_seed(0))
        game = LayerGame(model, tokens, batch_size=batch_size)
        runner = BlockSweep(model, tokens, batch_size=batch_size) if mode == "in_memory_sweep" else game
        started = time.perf_counter()
        values[mode] = {row: value for row, value, _ in runner.measure(batch)}
        out[f"{mode}_s_per_mask"] = round((time.perf_counter() - started) / masks, 3)
        del model, game, runner
    out["streamed_over_in_memory"] = round(out["streamed_s_per_mask"] / out["in_memory_s_per_mask"], 3)
    out["streamed_over_in_memory_sweep"] = round(out["streamed_s_per_mask"] / out["in_memory_sweep_s_per_mask"], 3)
    out["equal"] = values["in_memory"] == values["streamed"] == values["in_memory_sweep"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--work", default=None, help="directory for the shaped checkpoints (a few MB on disk)")
    parser.add_argument("--masks", type=int, default=16)
    parser.add_argument("--runs", default=",".join(RUNS), help="which 8B runs")
    args = parser.parse_args()
    parts = args.parts.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="layershap-streaming-"))
    result: dict = {"work": str(work)}
    if "per-mask" in parts:
        from layershap.models.shaped import write_shaped_checkpoint

        one_b = work / "llama-3.2-1b"
        write_shaped_checkpoint(one_b, "llama-3.2-1b")
        result["per_mask"] = [
            per_mask(None, "SmolLM2-135M (embedded default)", masks=args.masks, samples=8, seq_len=128,
                     batch_size=8),
            per_mask(str(one_b), "Llama-3.2-1B shape", masks=max(4, args.masks // 2), samples=1, seq_len=64,
                     batch_size=1),
        ]
        Path(args.out).write_text(json.dumps(result, indent=2))
    if "8b" in parts:
        result["llama_3_8b"] = eight_b(work, "llama-3-8b", args.runs.split(","))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
