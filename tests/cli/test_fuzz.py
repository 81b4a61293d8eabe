"""Property-based fuzzing of the command line: whatever the option values, paths and text files, a command
ends in exit code 0 or in one line and exit code 2, never in a traceback or another code.

In-process `main([...])` calls on a tiny saved model, a bounded number of examples, no deadline (the first
call of a command loads torch and transformers); about a minute in CI.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("LAYERSHAP_FUZZ_EXAMPLES", "60"))

# Option values a user might type, including wrong ones.
NUMBERS = st.one_of(st.integers(-3, 40).map(str), st.sampled_from(["0", "-1", "1e9", "nan", "inf", "0.5", "", " ",
                                                                  "1,2", "abc", "2" * 30]))
RATIOS = st.one_of(st.floats(-1, 2).map(str), st.sampled_from(["0", "1", "0.34", "x", "", "nan"]))
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
ODD_BYTES = st.one_of(st.binary(max_size=400), st.sampled_from([b"", b"\xff\xfe\x00\x00", b"\x00" * 64,
                                                                b"caf\xc3\xa9 " * 80, b"\xed\xa0\x80 bad utf-8 " * 30,
                                                                b"\r\n" * 50]))


def _run(argv) -> tuple[int, str]:
    from layershap.cli.app import main

    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            return code, err.getvalue()
    return 0, err.getvalue()


@st.composite
def invocations(draw, model_dir, workdir):
    """A command line over a few cheap commands, with option values, paths and text files drawn."""
    text_file = workdir / f"text-{draw(st.integers(0, 3))}.txt"
    text_file.write_bytes(draw(ODD_BYTES))
    paths = st.sampled_from([str(model_dir), str(text_file), str(workdir / "missing" / "x"), "/proc/x",
                             "/dev/null", str(workdir), "", "-", str(workdir / "out dir é")])
    toml = workdir / "config.toml"
    toml.write_bytes(draw(st.one_of(ODD_BYTES, st.sampled_from([b"budget = 20\n", b"samples = -4\n",
                                                                  b"[layershap]\ncommand = 'prune'\n",
                                                                  b"seq_len = 'x'\n", b"bogus = 1\n"]))))
    command = draw(st.sampled_from(["layers", "ppl", "estimate-dry", "estimate", "prune", "report", "methods"]))
    model = draw(st.one_of(st.just(str(model_dir)), paths))
    data = draw(st.one_of(st.just(str(text_file)), paths, TEXT))
    if command == "layers":
        argv = ["layers", "--model", model]
    elif command == "ppl":
        argv = ["ppl", "--model", model, "--data", data, "--samples", draw(NUMBERS), "--seq-len", draw(NUMBERS)]
    elif command in ("estimate-dry", "estimate"):
        argv = ["estimate", "--model", model, "--data", data, "--samples", draw(NUMBERS), "--seq-len",
                draw(NUMBERS), "--budget", draw(NUMBERS), "--out", draw(paths), "--store",
                draw(st.one_of(st.just(str(workdir / "store.sqlite")), paths))]
        if command == "estimate-dry":
            argv.append("--dry-run")
    elif command == "prune":
        argv = ["prune", "--model", model, "--data", data, "--ratio", draw(RATIOS), "--method",
                draw(st.sampled_from(["last", "shortgpt", "nope", ""])), "--out", draw(paths), "--samples",
                draw(NUMBERS), "--seq-len", draw(NUMBERS), "--eval-data", data, "--eval-samples", "2",
                "--eval-seq-len", draw(NUMBERS), "--protect", draw(st.one_of(TEXT, st.just("0,-1")))]
    elif command == "report":
        argv = ["report", draw(paths)]
    else:
        argv = ["methods"]
    if draw(st.booleans()):
        argv += ["--config", str(toml)]
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--bogus", "--budget", "--", "-x", "é"])))
    return argv


def test_the_command_line_never_ends_in_a_traceback(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("fuzz")
    import torch

    torch.set_num_threads(1)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(invocations(tiny_model_dir, workdir))
    def check(argv):
        code, err = _run(argv)
        assert "Traceback" not in err, (argv, err)
        assert code in (0, 2), (argv, code, err)
        if code == 2:
            lines = [line for line in err.splitlines() if line.strip() and "━" not in line]
            assert len(lines) == 1 and lines[0].startswith("layershap: error: "), (argv, err)

    check()
