"""The `layershap` command line: one module per command group, each registering its commands on the app
in `cli/app.py`. The CLI parses, calls the API and prints; it holds no logic of its own."""

from layershap.cli.app import app, main

__all__ = ["app", "main"]
