"""Masked evaluation and whole estimates in bfloat16 on a CUDA GPU, on a model of Llama-2-7B's shape.

A device machine ships no weights and reaches no hub, so by default the model is built from a Llama-2-7B
config with random weights (`--model PATH` loads local weights instead). Random weights do not change what
is measured here: the time of a forward pass depends on the shapes, not on the values. The windows are random
token ids for the same reason.

What it reports, on the calibration size `prune` uses (8 windows of 128 tokens) and on a larger one:
- full / outside / masked pass seconds, `head_fraction` and `skip_cost_ratio` as in `eval_cost.py`;
- `batch_cost_ratio`: average seconds per mask over a `--budget` sample evaluated with prefix sharing
  (`LayerGame.measure`) / one full pass, and whether those NLLs equal the plain path's bit for bit;
- `estimate_seconds`: one whole `layershap.estimate.pipeline.estimate` at that budget (masks, evaluations into a
  fresh store, surrogate, Shapley values), split into evaluation and surrogate + Shapley time;
- `search_seconds`: the default `shapley` method's whole plan search at that budget (fresh store);
- peak GPU memory.

    python benchmarks/gpu.py --json gpu.json
    python benchmarks/gpu.py --device cpu --dtype float32 --layers 4 --hidden 64 --intermediate 128 \
        --heads 4 --vocab 512 --budget 24   # a smoke test of the script itself, no GPU needed
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _setup import timed_interleaved, write_result

from layershap.estimate.pipeline import EstimateSettings, estimate, estimate_from_measurements, sample_masks
from layershap.game.layer_game import LayerGame
from layershap.game.nll import mean_nll
from layershap.game.prefix import plain_nlls
from layershap.game.store import open_store
from layershap.models.layers import keep_only, num_layers
from layershap.plan.methods import select_layers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        return model.eval(), f"local weights {args.model}"
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=4096, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), "random weights, Llama-2-7B's shape" if args.layers == 32 and args.hidden == 4096 else \
        "random weights, a small Llama config"


def pass_costs(model, tokens: torch.Tensor, k: int, repeats: int, device: torch.device) -> dict:
    n = num_layers(model)

    def run(mask):
        with keep_only(model, mask):
            return mean_nll(model, tokens)

    one_mask = np.ones(n, dtype=bool)
    one_mask[np.random.default_rng(0).choice(n, k, replace=False)] = False
    seconds = timed_interleaved({"full": lambda: run(np.ones(n, dtype=bool)),
                                 "outside": lambda: run(np.zeros(n, dtype=bool)),
                                 "masked": lambda: run(one_mask)}, repeats, lambda: synchronize(device))
    full, outside, masked = seconds["full"], seconds["outside"], seconds["masked"]
    head = outside / full
    expected = head + one_mask.mean() * (1 - head)
    return {"windows": list(tokens.shape), "full_pass_seconds": full, "outside_pass_seconds": outside,
            "masked_pass_seconds": masked, "head_fraction": head, "single_mask_kept_fraction": float(one_mask.mean()),
            "skip_cost_ratio": masked / full, "skip_cost_expected": float(expected),
            "skip_within_5_percent": bool(abs(masked / full - expected) <= 0.05 * expected),
            "tokens_per_second_full": tokens.numel() / full}


def batch_cost(model, tokens: torch.Tensor, budget: int, k: int, full_seconds: float, device) -> dict:
    n = num_layers(model)
    masks = sample_masks(EstimateSettings(budget=budget, target_removed=k), n)
    game = LayerGame(model, tokens)
    fast = np.full(len(masks), np.nan)
    synchronize(device)
    started = time.perf_counter()
    for row, nll, _ in game.measure(masks):
        fast[row] = nll
    seconds = time.perf_counter() - started
    check = np.arange(0, len(masks), max(1, len(masks) // 16))
    plain = plain_nlls(model, tokens, masks[check])
    return {"budget": len(masks), "kept_fraction": float(masks.mean()), "batch_seconds": seconds,
            "seconds_per_mask": seconds / len(masks), "batch_cost_ratio": seconds / len(masks) / full_seconds,
            "prefix_sharing": bool(game._prefix.enabled),
            "fast_path_equals_plain_path": bool(np.array_equal(plain, fast[check])),
            "max_abs_difference_from_plain_path": float(np.max(np.abs(plain - fast[check]))),
            "masks_checked_against_plain_path": len(check)}


def whole_runs(model, tokens: torch.Tensor, budget: int, k: int, scratch: Path) -> dict:
    settings = EstimateSettings(budget=budget, target_removed=k)
    game = LayerGame(model, tokens)
    with open_store(model, scratch / "estimate.sqlite") as store:
        started = time.perf_counter()
        result = estimate(game, store, settings)
        total = time.perf_counter() - started
    started = time.perf_counter()
    estimate_from_measurements(game.utility, result.masks, result.nlls, settings)
    modelling = time.perf_counter() - started
    started = time.perf_counter()
    plan = select_layers("shapley", model, tokens, k, store=scratch / "search.sqlite")
    search = time.perf_counter() - started
    fit = {key: value for key, value in result.surrogate_fit.items() if key != "holdout"}
    return {"estimate_seconds": total, "estimate_evaluations": result.evaluations,
            "estimate_surrogate_and_shapley_seconds": modelling, "estimate_surrogate_fit": fit,
            "search_seconds": search, "search_forward_passes": plan.forward_passes, "search_removes": plan.remove}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local weights; default: random, Llama-2-7B's shape")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--windows", default="8x128,32x512", help="calibration shapes to time, first is the default")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--other-budget", type=int, default=128, help="masks in the batch timing of the other shapes")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible; run this on a GPU machine (or pass --device cpu for a smoke test)")

    started = time.perf_counter()
    model, source = build_model(args, device, dtype)
    synchronize(device)
    import transformers

    result = {"model": source, "parameters": sum(p.numel() for p in model.parameters()),
              "layers": num_layers(model), "dtype": args.dtype, "build_seconds": time.perf_counter() - started,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "torch": torch.__version__, "transformers": transformers.__version__, "k": args.k, "shapes": {}}
    print({key: value for key, value in result.items() if key != "shapes"}, flush=True)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for position, shape in enumerate(args.windows.split(",")):
        samples, seq_len = (int(part) for part in shape.split("x"))
        tokens = torch.randint(0, vocab, (samples, seq_len), generator=generator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = pass_costs(model, tokens, args.k, args.repeats, device)
        row.update(batch_cost(model, tokens, args.budget if position == 0 else args.other_budget, args.k, row["full_pass_seconds"], device))
        if position == 0:  # the whole pipeline on the calibration size prune uses
            with tempfile.TemporaryDirectory() as scratch:
                row.update(whole_runs(model, tokens, args.budget, args.k, Path(scratch)))
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        result["shapes"][shape] = row
        print(shape, row, flush=True)
        if args.json:
            write_result(args.json, result)
    if not args.json:
        write_result(None, result)


if __name__ == "__main__":
    main()
