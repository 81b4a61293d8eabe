"""`estimate`: every block's Shapley value on calibration text, written to a run directory; and its dry run,
which says how many forward passes and roughly how long, evaluating nothing."""

from __future__ import annotations

import time
from pathlib import Path

from layershap import __version__
from layershap.api.run import provenance, run_parameters
from layershap.config import versions, write_run_config
from layershap.data.windows import text_windows
from layershap.errors import LayershapError
from layershap.game.nll import perplexity
from layershap.io import read_json, write_json
from layershap.models.layers import num_layers
from layershap.models.load import model_label


def estimate_run(model, tokenizer, *, out, settings, model_name: str | None = None, data: str = "c4",
                 samples: int = 8, seq_len: int = 128, batch_size: int = 8, store=None, backend=None,
                 config: dict | None = None, granularity: str = "block") -> dict:
    """Estimate every layer's Shapley value and write `out/shapley.json`, `out/shapley.csv` and
    `out/config.toml` (backend and config as for `prune_model`).

    granularity "sublayer": the players are attn.i and mlp.i (2n); the record then says `granularity`, every
    entry of `layers` has its `name`, and shapley.csv gains a name column."""
    from layershap.estimate.pipeline import estimate
    from layershap.game.backends import use_backend
    from layershap.game.layer_game import LayerGame
    from layershap.game.store import open_store

    out = Path(out)
    calibration = text_windows(data, tokenizer, samples=samples, seq_len=seq_len, seed=settings.seed,
                               split="calibration")
    game = LayerGame(model, calibration, utility=settings.utility, batch_size=batch_size, granularity=granularity)
    with open_store(model, store) as db:
        _check_run_dir(out, db.model_fp)
        with use_backend(backend):
            result = estimate(game, db, settings)
        store_path = str(db.path)
    record = {
        **result.to_dict(),
        "model": model_label(model_name),
        "model_fingerprint": db.model_fp,
        "calibration": calibration.describe(),
        "store": store_path,
        "layershap_version": __version__,
        "versions": versions(),
    }
    if granularity == "sublayer":
        record["granularity"] = granularity
        for entry, name in zip(record["layers"], game.player_names):
            entry["name"] = name
        lines = ["index,name,shapley,stderr"] + [f"{e['index']},{e['name']},{e['shapley']:.8g},{e['stderr']:.8g}"
                                                 for e in record["layers"]]
    else:
        lines = ["index,shapley,stderr"] + [f"{e['index']},{e['shapley']:.8g},{e['stderr']:.8g}"
                                            for e in record["layers"]]
    write_json(out / "shapley.json", record)
    (out / "shapley.csv").write_text("\n".join(lines) + "\n")
    parameters = run_parameters(model, model_name, settings, config, out=out, data=data, samples=samples,
                                 seq_len=seq_len, batch_size=batch_size, store=store)
    if granularity != "block":
        parameters["granularity"] = granularity
    write_run_config(out, "estimate", parameters, provenance(db.model_fp, calibration, {}, backend))
    return record


def estimate_dry_run(model, tokenizer, *, settings, data: str = "c4", samples: int = 8, seq_len: int = 128,
                     batch_size: int = 8, store=None, granularity: str = "block") -> dict:
    """How many forward passes an estimate would run and roughly how long; evaluates no mask.

    The time per pass comes from earlier evaluations in the store, or else from one timed full pass.
    """
    from layershap.estimate.budget import mask_share
    from layershap.estimate.pipeline import sample_masks
    from layershap.game.context import measurement_context
    from layershap.game.layer_game import LayerGame
    from layershap.game.store import mask_key, open_store

    n = num_layers(model) * (2 if granularity == "sublayer" else 1)  # the players
    settings.check(n)
    calibration = text_windows(data, tokenizer, samples=samples, seq_len=seq_len, seed=settings.seed,
                               split="calibration")
    game = LayerGame(model, calibration, utility=settings.utility, batch_size=batch_size, granularity=granularity)
    masks = sample_masks(settings, n, num_layers(model))
    with open_store(model, store) as db:
        context = measurement_context(game)
        known = db.get_many(context, masks)
        per_layer_pass = db.mean_seconds_per_block(context)
    todo = [m for m in masks if mask_key(m) not in known]
    if per_layer_pass is None:
        started = time.perf_counter()
        perplexity(model, calibration.tokens, batch_size=batch_size)
        per_layer_pass = (time.perf_counter() - started) / n
    seconds = sum(per_layer_pass * max(int(m.sum()), 1) for m in todo)
    share = mask_share(num_layers(model), settings.budget_unit)
    reference = 1 if todo and game.loss == "kl" else 0  # --utility kl: the dense model's reference pass first
    return {"masks": len(masks), "stored": len(masks) - len(todo), "forward_passes": len(todo) + reference,
            "full_size_passes": float(sum(share(m) for m in masks)),
            "estimated_seconds": seconds + reference * per_layer_pass * n}


def _check_run_dir(out: Path, model_fp: str) -> None:
    existing = out / "shapley.json"
    if existing.is_file():
        try:
            previous = read_json(existing).get("model_fingerprint")
        except ValueError:
            previous = None
        if previous not in (None, model_fp):
            raise LayershapError(f"{out} holds an estimate of another model (fingerprint {previous}); "
                                 "give another --out")
