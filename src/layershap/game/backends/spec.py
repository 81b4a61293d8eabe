"""What a remote worker needs to load the same model as the driver, as a plain value that pickles."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model for itself: what `load_model` is given on the command line."""

    name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def to_dict(self) -> dict:
        return asdict(self)
