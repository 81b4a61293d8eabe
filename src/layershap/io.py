"""Small file helpers shared by every stage that writes results."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path, data) -> None:
    """Write JSON atomically, so a killed process never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def check_writable_dir(path, option: str = "--out") -> Path:
    """Create `path` (and its parents) and write and remove a probe file there now, so an output folder that
    cannot be written (read-only, a file, under /proc, a full disk) is one line before any work is done."""
    import errno
    import os
    import tempfile

    from layershap.errors import LayershapError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".layershap-probe-")
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise LayershapError(f"cannot write to {option} {path}: {reason}") from None
    return path


def check_out_is_not_the_model(out, model: str | None, option: str = "--out") -> None:
    """Refuse an output that is the model being read (the same directory or .gguf file): writing there
    replaces the weights while they are read (safetensors and GGUF files are memory-mapped), and the source
    model is lost either way."""
    from layershap.errors import LayershapError

    if out is None or not model:
        return
    source = Path(model).expanduser()
    try:
        same = source.exists() and Path(out).expanduser().resolve() == source.resolve()
    except OSError:
        return
    if same:
        raise LayershapError(f"{option} {out} is the model being read (--model {model}); writing there would "
                             f"replace it while it is read; give another {option}")


def save_pretrained(model, out: Path, **kwargs) -> None:
    """`model.save_pretrained`, with a failure to write the weights as one line: safetensors reports a full
    disk or any other I/O error as its own `SafetensorError`, not an OSError, which would otherwise end the
    command in a traceback (and leave a folder with a config and no weights, which the message names)."""
    from layershap.errors import LayershapError

    try:
        model.save_pretrained(out, **kwargs)
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        text = str(exc)
        reason = ("the disk is full" if "No space left" in text or "os error 28" in text
                  else (text.splitlines() or ["unknown error"])[0])
        raise LayershapError(f"cannot write the model's weights to {out}: {reason}; what was written there is "
                             "incomplete: free space (or write elsewhere) and run again") from None


def describe_os_error(exc: OSError) -> str:
    """An OSError as one line: what failed, on which path."""
    import errno

    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    where = f" {exc.filename}" if exc.filename else ""
    other = f" -> {exc.filename2}" if exc.filename2 else ""
    return f"cannot write or read{where}{other}: {reason}"


def gguf_sidecar(out, name: str) -> Path:
    """`pruned.gguf` -> `pruned.layershap.json` / `pruned.config.toml`: a GGUF run's record beside the file."""
    out = Path(out)
    stem = out.name[:-len(".gguf")] if out.name.lower().endswith(".gguf") else out.name
    return out.with_name(f"{stem}.{name}")
