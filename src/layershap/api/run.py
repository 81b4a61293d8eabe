"""What every run directory records beside its results: config.toml's parameters (the options with the values
the run actually used) and its provenance (fingerprints of the model and the windows, the backend)."""

from __future__ import annotations


def run_parameters(model, model_name, settings, config, **values) -> dict:
    """What a run directory's config.toml records: the CLI's options, with the values actually used (preset
    and defaults resolved, the dtype the model was loaded in) taking their place."""
    resolved = {"model": model_name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                **values}
    if settings is not None:
        resolved.update({key: getattr(settings, key) for key in ("budget", "sampler", "surrogate", "utility",
                                                                   "paired", "seed")})
    return {**(config or {}), **{key: value for key, value in resolved.items() if value is not None}}


def provenance(model_fp: str, calibration, held_out: dict, backend) -> dict:
    return {"model_fingerprint": model_fp, "calibration_fingerprint": calibration.fingerprint(),
            "evaluation_fingerprints": [f"{name}:{w.fingerprint()}" for name, w in held_out.items()] or None,
            "backend": getattr(backend, "name", "local"), "ray_address": getattr(backend, "address", None)}
