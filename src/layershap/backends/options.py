"""The `--backend` and `--ray-address` options, for any command that evaluates masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layershap.backends import Backend, ModelSpec, make_backend

BackendOption = Annotated[str, typer.Option(
    "--backend", help="Where masked evaluations run: local (this process) or ray (a Ray cluster: one worker "
                      "per GPU; see docs/scaling.md).")]
RayAddressOption = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster to join (HOST:PORT of its head, ray://HOST:PORT, or auto); default: "
                          "$RAY_ADDRESS, else a local cluster started for the run.")]


def backend_from_options(backend: str, ray_address: str | None, *, model: str | None, dtype: str, device: str,
                         trust_remote_code: bool) -> Backend:
    """The backend the options ask for; workers load the model from the same options as the driver."""
    if model is not None and Path(model).expanduser().exists():  # workers may start in another directory
        model = str(Path(model).expanduser().resolve())
    spec = ModelSpec(name=model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return make_backend(backend, spec=spec, address=ray_address)
