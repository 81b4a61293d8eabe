"""What `--utility kl` costs beside the NLL: time per mask evaluation, memory, and the dense reference's size.

Two models, the same masks and windows for both losses:

- the embedded default (SmolLM2-135M, 30 blocks, vocabulary 49152) on the benchmark calibration windows
  (8 x 128 tokens of C4, `_setup.py`): seconds per evaluation of a full pass and of a k-removal mask on the
  plain path (NLL and KL interleaved, median of `--repeats`), and of `--budget` sampled masks through
  `LayerGame.measure` (prefix sharing on, so the head's share, and with it the KL's overhead, is larger);
- a "7B-shaped" random Llama (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000) built from a config
  with only 2 blocks, in bfloat16 where the CPU supports it, on 2 x 128 tokens. A 32-block 7B model does not
  fit this machine's 24 GB of RAM; the two blocks are enough because the KL's extra work and memory are all
  in the head (the log-softmax over the vocabulary, the gather, the scatter and the logsumexp), which a
  2-block model has in full, and the reference's size depends only on tokens x k.

Memory: the peak resident memory of one evaluation above the resident memory before it (Linux VmHWM after
resetting it through /proc/self/clear_refs), each loss in its own fresh process, with glibc told to map every
allocation from 64 KiB up on its own (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the process and the
resident memory before the evaluation is what is live; both run one full pass before the reset (KL: building
the dense reference, as a run does before its evaluations; NLL: a plain pass), since a process's first pass
leaves memory resident that later passes reuse. Also the reference's bytes and the seconds to build it.

    python benchmarks/kl_utility.py --json kl_utility.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _setup import anchors_setup, timed_interleaved, write_result

from layershap.estimate.pipeline import EstimateSettings, sample_masks
from layershap.game.kl import KL_TOP_K, dense_reference
from layershap.game.layer_game import LayerGame
from layershap.game.nll import batch_nll, mean_loss
from layershap.models.layers import keep_only, num_layers

SEVEN_B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
           "vocab_size": 32000, "num_hidden_layers": 2, "max_position_embeddings": 4096}


def seven_b_shaped(dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SEVEN_B)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def cpu_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setup(shape: str):
    """(model, calibration tokens [windows, seq_len], a mask dropping about a quarter of the blocks)."""
    if shape == "default":
        model, _, calibration, _ = anchors_setup()
        tokens = calibration.tokens
    else:
        model = seven_b_shaped(torch.bfloat16 if cpu_bf16() else torch.float32)
        tokens = torch.randint(0, SEVEN_B["vocab_size"], (2, 128), generator=torch.Generator().manual_seed(0))
    n = num_layers(model)
    mask = np.ones(n, dtype=bool)
    mask[np.random.default_rng(0).choice(n, max(1, n // 4), replace=False)] = False
    return model, tokens, mask


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(shape: str, loss: str) -> dict:
    """Peak resident bytes of one masked evaluation above those before it, in this (fresh) process."""
    model, tokens, mask = setup(shape)
    # one full pass before the reset for both losses (KL: the reference; NLL: a plain pass): the first pass of
    # a process leaves memory resident (about 520 MiB on the default model, whichever loss), which the next
    # evaluation reuses
    fn = batch_nll
    if loss == "kl":
        fn = dense_reference(model, tokens, batch_size=8)
    else:
        mean_loss(model, tokens, batch_size=8, loss=batch_nll)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status("VmRSS")
    with keep_only(model, mask):
        mean_loss(model, tokens, batch_size=8, loss=fn)
    return {"peak_bytes_above_resident": _status("VmHWM") - before, "resident_before": before}


def memory(shape: str) -> dict:
    out = {}
    for loss in ("nll", "kl"):
        # every allocation from 64 KiB up is its own mmap, given back to the system when freed: what is
        # resident is what is live, and a pass before the reset (the reference) leaves no pages to reuse
        done = subprocess.run([sys.executable, __file__, "--memory-child", shape, loss], capture_output=True,
                              text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        out[loss] = json.loads(done.stdout.strip().splitlines()[-1])
    out["kl_over_nll"] = out["kl"]["peak_bytes_above_resident"] / out["nll"]["peak_bytes_above_resident"]
    return out


def timing(shape: str, repeats: int, budget: int) -> dict:
    model, tokens, mask = setup(shape)
    n = num_layers(model)
    started = time.perf_counter()
    reference = dense_reference(model, tokens, batch_size=8)
    reference_seconds = time.perf_counter() - started

    def run(keep, loss):
        with keep_only(model, keep):
            return mean_loss(model, tokens, batch_size=8, loss=loss)

    full = np.ones(n, dtype=bool)
    seconds = timed_interleaved({"full_nll": lambda: run(full, batch_nll), "full_kl": lambda: run(full, reference),
                                 "masked_nll": lambda: run(mask, batch_nll),
                                 "masked_kl": lambda: run(mask, reference)}, repeats)
    result = {
        "model": "SmolLM2-135M (embedded default)" if shape == "default" else "7B-shaped random Llama, 2 blocks",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "n_layers": n,
        "vocab": int(model.config.vocab_size),
        "windows": list(tokens.shape),
        "k": KL_TOP_K,
        "threads": torch.get_num_threads(),
        "reference_bytes": reference.nbytes,
        "reference_bytes_per_position": reference.nbytes / reference.rest_logp.numel(),
        "reference_seconds": reference_seconds,
        "seconds": seconds,
        "kl_over_nll_full": seconds["full_kl"] / seconds["full_nll"],
        "kl_over_nll_masked": seconds["masked_kl"] / seconds["masked_nll"],
        "mask_removed": [int(i) for i in np.flatnonzero(~mask)],
        "full_model_kl": run(full, reference),
        "masked_kl": run(mask, reference),
    }
    if budget and n > 2:
        masks = sample_masks(EstimateSettings(budget=budget, budget_unit="masks", target_removed=max(1, n // 4)), n)
        games = {"nll": LayerGame(model, tokens, utility="neg_nll"), "kl": LayerGame(model, tokens, utility="kl")}
        games["kl"].batch_loss()  # the reference outside the timing: paid once per game, reported above
        spent = dict.fromkeys(games, 0.0)
        # the two games take turns mask by mask (both visit the masks in the same order), so a slow spell of
        # a shared machine lands on both
        for (_, _, nll_seconds), (_, _, kl_seconds) in zip(games["nll"].measure(masks), games["kl"].measure(masks)):
            spent["nll"] += nll_seconds
            spent["kl"] += kl_seconds
        result["game_measure"] = {"masks": len(masks), "seconds_per_mask_nll": spent["nll"] / len(masks),
                                  "seconds_per_mask_kl": spent["kl"] / len(masks),
                                  "kl_over_nll": spent["kl"] / spent["nll"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=16, help="masks measured through LayerGame.measure")
    parser.add_argument("--shapes", default="default,7b")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-child", nargs=2, metavar=("SHAPE", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    result = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__}
    for shape in args.shapes.split(","):
        entry = timing(shape, args.repeats, args.budget if shape == "default" else 0)
        entry["memory"] = memory(shape)
        result[shape] = entry
        s = entry["seconds"]
        print(f"{entry['model']} ({entry['dtype']}, {entry['windows'][0]}x{entry['windows'][1]} tokens, "
              f"{entry['threads']} threads)")
        print(f"  full pass       NLL {s['full_nll']:.3f} s   KL {s['full_kl']:.3f} s   ratio "
              f"{entry['kl_over_nll_full']:.3f}")
        print(f"  masked pass     NLL {s['masked_nll']:.3f} s   KL {s['masked_kl']:.3f} s   ratio "
              f"{entry['kl_over_nll_masked']:.3f}")
        if "game_measure" in entry:
            g = entry["game_measure"]
            print(f"  {g['masks']} masks via LayerGame.measure (prefix sharing): NLL {g['seconds_per_mask_nll']:.3f} "
                  f"s/mask   KL {g['seconds_per_mask_kl']:.3f} s/mask   ratio {g['kl_over_nll']:.3f}")
        m = entry["memory"]
        print(f"  peak memory of one evaluation above resident: NLL "
              f"{m['nll']['peak_bytes_above_resident'] / 2**20:.1f} MiB   KL "
              f"{m['kl']['peak_bytes_above_resident'] / 2**20:.1f} MiB   ratio {m['kl_over_nll']:.3f}")
        print(f"  dense reference: {entry['reference_bytes'] / 2**20:.3f} MiB "
              f"({entry['reference_bytes_per_position']:.0f} bytes per position), built in "
              f"{entry['reference_seconds']:.2f} s; full-model KL {entry['full_model_kl']}, masked KL "
              f"{entry['masked_kl']:.4f}")
    write_result(args.json, result)


if __name__ == "__main__":
    main()
