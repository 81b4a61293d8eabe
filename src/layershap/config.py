"""Run configurations: `--config FILE.toml` on the command line, and `config.toml` in every run directory.

A configuration file holds flat `key = value` lines, one per option of the command it is given to, named
like the option (`seq_len` or `seq-len`); lists stand for comma-separated options (`eval_data = ["wiki",
"c4"]`). An option given on the command line overrides the file. Keys the command does not have are
refused, all named in one line.

Every run directory gets the configuration it actually ran with (every option, presets resolved) followed
by a `[layershap]` table of provenance: the command and its exact command line, the versions of layershap,
torch and transformers, and the fingerprints of the model and of the text windows. The table is ignored
when the file is read back, except that its command must be the one the file is given to, so
`layershap estimate --config RUN/config.toml` runs that estimate again.
"""

from __future__ import annotations

import datetime
import math
import platform
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated

import typer

from layershap import __version__
from layershap.errors import LayershapError

CONFIG_FILE = "config.toml"
PROVENANCE_TABLE = "layershap"
# Options that say how or whether a run is executed, not what it computes: never written as parameters
# (backend and address go into the provenance table instead).
NOT_WRITTEN = frozenset({"config", "dry_run", "backend", "ray_address"})

_invocation: list[str] | None = None


# --- reading -------------------------------------------------------------------------------------------------


def load_config(path, *, command: str, parameters: Iterable[str]) -> dict:
    """The option values in a TOML file, checked against the command's option names (python spelling)."""
    path = Path(path)
    if not path.is_file():
        raise LayershapError(f"config file {path} does not exist; give a TOML file such as a run's config.toml")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LayershapError(f"config file {path} is not valid TOML ({str(exc).splitlines()[0]})") from None
    provenance = data.pop(PROVENANCE_TABLE, None)
    written_by = provenance.get("command") if isinstance(provenance, dict) else None
    if written_by not in (None, command):
        raise LayershapError(f"config file {path} is the configuration of `layershap {written_by}`; "
                             f"use it with that command, not `{command}`")
    known = set(parameters) - {"config"}
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(str(key) for key in data if str(key).replace("-", "_") not in known)
    if unknown:
        raise LayershapError(f"config file {path}: unknown key{'s' if len(unknown) > 1 else ''} for "
                             f"`layershap {command}`: {', '.join(unknown)}")
    return {key: _as_option_value(key, value, path) for key, value in values.items()}


def _as_option_value(key: str, value, path: Path):
    if isinstance(value, list):
        if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
            raise LayershapError(f"config file {path}: {key} must be a list of names or numbers")
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        raise LayershapError(f"config file {path}: {key} is a table; options take single values or lists")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return value


def _apply_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None):
    """Eager `--config` callback: the file's values become the command's defaults, so options given on the
    command line still win."""
    if value is None:
        return value
    names = [p.name for p in ctx.command.params if p.name]
    values = load_config(value, command=ctx.info_name or ctx.command.name or "", parameters=names)
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


ConfigOption = Annotated[Path | None, typer.Option(
    "--config", callback=_apply_config, is_eager=True, metavar="FILE.toml",
    help="Read options from a TOML file (e.g. a run's config.toml); options given here override it.")]


# --- writing -------------------------------------------------------------------------------------------------


def remember_invocation(argv: list[str]) -> None:
    """The command line as typed (called by the CLI's entry point), recorded in run directories."""
    global _invocation
    _invocation = [str(a) for a in argv]


def command_line() -> str | None:
    return shlex.join(["layershap", *_invocation]) if _invocation is not None else None


def versions() -> dict[str, str]:
    """Versions of what decides a run's numbers."""
    import numpy
    import torch
    import transformers

    return {"layershap": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def parameters_from_context(ctx, **resolved) -> dict:
    """The options a command ran with: what click parsed (command line, config file, defaults), with the
    values presets and defaults resolved to in place of None."""
    values = dict(getattr(ctx, "params", {}) or {})
    values.update({key: value for key, value in resolved.items() if value is not None})
    return values


def write_run_config(out, command: str, parameters: Mapping, provenance: Mapping, *, path=None) -> Path:
    """Write `out/config.toml` (or `path`: a GGUF run writes it beside its file): the parameters (None, and
    options that are not parameters, left out) and a [layershap] table of provenance."""
    path = Path(path) if path is not None else Path(out) / CONFIG_FILE
    params = {key: value for key, value in parameters.items() if key not in NOT_WRITTEN and value is not None}
    table = {"command": command, "command_line": command_line(), **versions(),
             "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "reproduce": f"layershap {command} --config {path}", **provenance}
    table = {key: value for key, value in table.items() if value is not None}
    text = (f"# layershap {command}: the configuration this run used, and where it came from.\n"
            f"# Run it again with: layershap {command} --config {path}\n"
            + dumps_toml(params, {PROVENANCE_TABLE: table}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def dumps_toml(values: Mapping, tables: Mapping[str, Mapping] | None = None) -> str:
    """TOML for flat values (str, int, float, bool, paths, and lists of them), plus one level of tables."""
    lines = [f"{_key(key)} = {_value(value)}" for key, value in values.items() if value is not None]
    for name, table in (tables or {}).items():
        lines += ["", f"[{_key(name)}]"]
        lines += [f"{_key(key)} = {_value(value)}" for key, value in table.items() if value is not None]
    return "\n".join(lines) + "\n"


def _key(key) -> str:
    key = str(key)
    return key if key and all(c.isalnum() or c in "_-" for c in key) and key.isascii() else _string(key)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return _string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if hasattr(value, "item"):  # numpy scalars
        return _value(value.item())
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _string(text: str) -> str:
    escaped = []
    for char in text:
        if char == "\\":
            escaped.append("\\\\")
        elif char == '"':
            escaped.append('\\"')
        elif char == "\n":
            escaped.append("\\n")
        elif char == "\t":
            escaped.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
