"""Property-based fuzzing of the command line: whatever the option values, paths and text files, a command
ends in exit code 0 or in one line and exit code 2, never in a traceback or another code.

In-process `main([...])` calls on a tiny saved model, a bounded number of examples, no deadline (the first
call of a command loads torch and transformers); about a minute in CI. The heavier commands (compare, heal,
quantize, eval, bench) get their own, smaller run at cheap settings (one window, a step, a token), and a fixed
list of invocations that each must reach: a cheap run that succeeds, and the bad values most likely to slip
past a check.
"""

from __future__ import annotations

import os

import pytest
from conftest import error_lines, run_cli_quietly

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


def _check(argv) -> int:
    """The exit code, after checking it is 0, or 2 with one line of error and no traceback."""
    code, err = run_cli_quietly(argv)
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = error_lines(err)
        assert len(lines) == 1 and lines[0].startswith("layershap: error: "), (argv, err)
    return code


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
                "--eval-seq-len", draw(NUMBERS), "--protect", draw(st.one_of(TEXT, st.just("0,-1"))),
                "--repair", draw(st.sampled_from(["auto", "none", "scale", "replaceme-lstsq", "linearpatch", "nope",
                                                  ""])),
                "--repair-samples", draw(NUMBERS), "--offload", draw(st.sampled_from(["auto", "none", "disk", "x"])),
                "--granularity", draw(st.sampled_from(["block", "block", "sublayer", "layer"]))]
        if draw(st.booleans()):
            argv += ["--format", draw(st.sampled_from(["auto", "hf", "gguf", "decilm", "onnx"]))]
    elif command == "report":
        argv = ["report", draw(paths)]
    else:
        argv = ["methods"]
    if draw(st.booleans()):
        argv += ["--config", str(toml)]
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--bogus", "--budget", "--", "-x", "é"])))
    return argv


def test_the_command_line_never_ends_in_a_traceback(tmp_path_factory, tiny_model_dir, monkeypatch):
    workdir = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(workdir)  # a drawn `--out ""` writes into the working directory: not the checkout's
    import torch

    torch.set_num_threads(1)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(invocations(tiny_model_dir, workdir))
    def check(argv):
        _check(argv)

    check()


# One window of 8 tokens, one held-out window, one step, one timed run of a 4-token prompt and 2 new tokens.
CHEAP = {"data": ["--samples", "1", "--seq-len", "8"], "eval": ["--eval-samples", "1", "--eval-seq-len", "8"]}


# The heavier commands' counts (steps, repeats, tokens, documents, windows): wrong ones, but none so large that a
# run that accepts it takes minutes (`--steps 222...2` is a valid, endless fine-tune).
COUNTS = st.one_of(st.integers(-2, 4).map(str), st.sampled_from(["", " ", "x", "nan", "1.5", "1e9", "1,2"]))


def _heavier_options(model_dir, workdir, text) -> dict[str, dict[str, tuple[str, st.SearchStrategy]]]:
    """Per command, its options at a cheap value that works, and what a user might type there instead."""
    paths = st.sampled_from([str(model_dir), str(text), str(workdir / "missing" / "x"), "/dev/null", str(workdir),
                             "", str(workdir / "out dir é"), "/proc/x"])
    model = ("--model", (str(model_dir), paths))
    data = {"--data": (str(text), st.one_of(paths, TEXT, st.sampled_from(["c4,", "tiny:x", "wiki:0"]))),
            "--samples": ("1", COUNTS), "--seq-len": ("8", COUNTS)}
    held_out = {"--eval-data": (str(text), st.one_of(paths, TEXT)), "--eval-samples": ("1", COUNTS),
                "--eval-seq-len": ("8", COUNTS)}
    out = ("--out", (str(workdir / "out"), st.one_of(paths, st.just(str(workdir / "out" / "model.safetensors")))))
    return {
        "compare": dict([model, *data.items(), *held_out.items(), out,
                         ("--ratios", ("0.34", st.one_of(RATIOS, st.sampled_from(["0.2,0.5", "0.34,x", ",", "0.34,0.34"])))),
                         ("--methods", ("last", st.sampled_from(["last,shortgpt", "nope", "", "last,,", "shortgpt"]))),
                         ("--batch-size", ("8", COUNTS)), ("--protect", ("", st.one_of(TEXT, st.just("0,-1")))),
                         ("--repair", ("scale", st.sampled_from(["none", "scale,prunecomp", "linearpatch", "x", ",",
                                                                 "scale,,"]))),
                         ("--repair-samples", ("2", COUNTS))]),
        "heal": dict([model, *data.items(), *held_out.items(), out, ("--steps", ("1", COUNTS)),
                      ("--rank", ("1", COUNTS)), ("--alpha", ("2", RATIOS)), ("--lr", ("1e-3", RATIOS)),
                      ("--batch-size", ("1", COUNTS))]),
        "quantize": dict([model, *held_out.items(), out,
                          ("--scheme", ("int8", st.sampled_from(["int4", "int3", "", "INT8"]))),
                          ("--batch-size", ("8", COUNTS))]),
        "eval": dict([model, ("--tasks", ("piqa", st.one_of(TEXT, st.sampled_from(["nope", "", "piqa,,", "lambada"])))),
                      ("--limit", ("1", COUNTS)), ("--batch-size", ("8", COUNTS))]),
        "bench": dict([model, ("--batch-sizes", ("1", st.one_of(COUNTS, st.sampled_from(["1,x", "-2", "1,,2"])))),
                       ("--prompt-len", ("4", COUNTS)), ("--new-tokens", ("2", COUNTS)),
                       ("--repeats", ("1", COUNTS)), ("--warmup", ("0", COUNTS)),
                       ("--baseline", (str(model_dir), paths))]),
    }


@st.composite
def heavier_invocations(draw, options):
    """compare, heal, quantize, eval or bench at cheap settings that work, with none, one or two option values
    replaced by drawn ones (so most examples get past the first check), now and then a stray argument."""
    command = draw(st.sampled_from(sorted(options)))
    values = {name: good for name, (good, _) in options[command].items()}
    for name in draw(st.lists(st.sampled_from(sorted(values)), max_size=2, unique=True)):
        values[name] = draw(options[command][name][1])
    argv = [command, *(part for name, value in values.items() for part in (name, value))]
    if draw(st.integers(0, 4)) == 0:
        argv += ["--dtype", draw(st.sampled_from(["float16", "bfloat16", "int8", ""]))]
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--bogus", "--out", "--", "é"])))
    return argv


def test_the_heavier_commands_never_end_in_a_traceback(tmp_path_factory, tiny_model_dir, sample_text_file,
                                                      monkeypatch):
    """On a copy of the tiny model: a drawn `--out` may overwrite it (quantize --out MODEL), and the later
    examples then run on what was written there, as a user's next command would."""
    import shutil

    workdir = tmp_path_factory.mktemp("fuzz-heavier")
    model_dir = shutil.copytree(tiny_model_dir, workdir / "model")
    monkeypatch.chdir(workdir)  # `--out ""` is the working directory: a model and its card (README.md) land there

    @settings(max_examples=max(1, EXAMPLES // 3), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(heavier_invocations(_heavier_options(model_dir, workdir, sample_text_file)))
    def check(argv):
        _check(argv)

    check()


def _heavier_cases(model, text, out):
    """(argv, expected exit code): each command's cheap run that succeeds, then bad values it must refuse."""
    compare = ["compare", "--model", model, "--data", text, *CHEAP["data"], "--eval-data", text, *CHEAP["eval"]]
    heal = ["heal", "--model", model, "--data", text, *CHEAP["data"], "--eval-data", text, *CHEAP["eval"],
            "--steps", "1", "--batch-size", "1"]
    quantize = ["quantize", "--model", model, "--eval-data", text, *CHEAP["eval"]]
    bench = ["bench", "--model", model, "--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "2",
             "--repeats", "1", "--warmup", "0"]
    return [
        ([*compare, "--ratios", "0.34", "--methods", "last", "--out", f"{out}/compare"], 0),
        ([*compare, "--ratios", "1.5", "--methods", "last", "--out", f"{out}/compare"], 2),
        ([*compare, "--ratios", "0.34", "--methods", "nope", "--out", f"{out}/compare"], 2),
        ([*compare, "--ratios", "0.34", "--methods", "last", "--out", "/dev/null/x"], 2),
        ([*heal, "--out", f"{out}/healed"], 0),
        ([*heal, "--steps", "0", "--out", f"{out}/healed-0"], 2),
        ([*heal, "--rank", "0", "--out", f"{out}/healed-r"], 2),
        ([*heal, "--out", "/dev/null/x"], 2),
        ([*quantize, "--scheme", "int8", "--out", f"{out}/int8"], 0),
        ([*quantize, "--scheme", "int3", "--out", f"{out}/int3"], 2),
        ([*quantize, "--scheme", "int8", "--out", "/dev/null/x"], 2),
        ([*quantize, "--scheme", "int8", "--batch-size", "0", "--out", f"{out}/int8-b0"], 2),
        ([*compare, "--ratios", "0.34", "--methods", "last", "--batch-size", "0", "--out", f"{out}/compare"], 2),
        (["eval", "--model", model, "--tasks", "piqa", "--limit", "1"], 0),
        (["eval", "--model", model, "--tasks", "nope", "--limit", "1"], 2),
        (["eval", "--model", model, "--tasks", "piqa", "--limit", "-1"], 2),
        ([*bench, "--baseline", model], 0),
        ([*bench, "--baseline", f"{out}/missing"], 2),
        ([*bench, "--batch-sizes", "0"], 2),
        ([*bench, "--new-tokens", "0"], 2),
    ]


def test_the_heavier_commands_run_cheaply_and_refuse_bad_values_in_one_line(tmp_path, tiny_model_dir,
                                                                             sample_text_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, expected in _heavier_cases(str(tiny_model_dir), str(sample_text_file), str(tmp_path)):
        assert _check(argv) == expected, argv


@pytest.mark.parametrize("command", ["prune", "quantize", "heal"])
def test_out_cannot_be_the_model_being_read(command, tmp_path, tiny_model_dir, sample_text_file):
    """`--out` the `--model` directory replaced the model while it was read (found by the fuzz: quantize
    --model D --out D wrote an int4 model over D, and the next command ran that): one line, and the model is
    left as it was."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    cheap = {"prune": ["--data", sample_text_file, "--samples", "1", "--seq-len", "8", "--ratio", "0.34",
                       "--method", "last"],
             "quantize": ["--scheme", "int8"],
             "heal": ["--data", sample_text_file, "--samples", "1", "--seq-len", "8", "--steps", "1"]}[command]
    for out in (model, tmp_path / "." / "model", f"{model}/"):
        argv = [command, "--model", model, *cheap, "--eval-data", sample_text_file, "--eval-samples", "1",
                "--eval-seq-len", "8", "--out", out]
        code, err = run_cli_quietly(argv)
        assert code == 2 and "Traceback" not in err, (argv, err)
        (line,) = error_lines(err)
        assert "is the model being read" in line
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize("batch_size", ["0", "-1"])
def test_a_batch_size_below_one_is_one_line(batch_size, tmp_path, tiny_model_dir, sample_text_file):
    """--batch-size 0 ended ppl, estimate, prune, compare and quantize in a traceback (range() step 0, or a
    division by zero); found by the fuzz."""
    windows = ["--data", sample_text_file, "--samples", "1", "--seq-len", "8"]
    for argv in (["ppl", *windows], ["estimate", *windows, "--out", tmp_path / "e"],
                 ["prune", *windows, "--ratio", "0.34", "--method", "last", "--out", tmp_path / "p"]):
        code, err = run_cli_quietly([*argv, "--model", tiny_model_dir, "--batch-size", batch_size])
        expected = f"layershap: error: Invalid value for '--batch-size': must be at least 1; got {batch_size}"
        assert code == 2 and error_lines(err) == [expected], (argv, err)
