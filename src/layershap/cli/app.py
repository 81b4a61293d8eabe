"""The `layershap` app: the root command, the registration of every command module, and `main`.

Every mistake a user can fix ends as one line on stderr and exit code 2 (see `main`).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

try:  # typer >= 0.29 vendors its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import ClickException

from layershap import __version__
from layershap.config import remember_invocation
from layershap.errors import LayershapError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Prune whole layers of a language model by their Shapley value.")


def _version(value: bool):
    if value:
        typer.echo(f"layershap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = False):
    """Prune whole layers of a language model by their Shapley value."""


# Commands that live in modules of their own; each module has `register(app)`.
COMMAND_MODULES: tuple[str, ...] = ("layershap.cli.inspect", "layershap.cli.prune", "layershap.cli.evaluate",
                                    "layershap.cli.report", "layershap.cli.transform")


def _register_command_modules() -> None:
    from importlib import import_module

    for name in COMMAND_MODULES:
        import_module(name).register(app)


_register_command_modules()


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, torchao's optional-kernel notices) would bury our own output."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    if not {"--version", "--help", "-h"} & set(sys.argv[1:] if argv is None else argv):
        _quiet_libraries()
    remember_invocation(sys.argv[1:] if argv is None else argv)
    try:
        rc = app(args=argv, prog_name="layershap", standalone_mode=False)
    except LayershapError as exc:
        print(f"layershap: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a file-system failure (unwritable or full output, missing folder): one line
        from layershap.io import describe_os_error

        print(f"layershap: error: {describe_os_error(exc)}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `layershap`: the help is the answer
            print(exc.format_message())
            sys.exit(0)
        print(f"layershap: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("layershap: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
