"""Every command that writes config.toml reruns from it, in a fresh cache, to the same results (apart from
times and paths): each resolved setting round-trips, including those whose default depends on another."""

import json
import tomllib

import pytest
import torch
from conftest import run_cli

# Keys whose values are times or paths: they differ between two runs of the same configuration.
VOLATILE = ("seconds", "created", "time", "store", "out", "path", "command_line", "reproduce", "latency",
            "per_s", "peak_memory")


def _normalised(value):
    if isinstance(value, dict):
        return {key: _normalised(v) for key, v in value.items()
                if not any(word in str(key).lower() for word in VOLATILE)}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def _results(run):
    found = {}
    for path in sorted(run.rglob("*")):
        if not path.is_file() or path.name == "config.toml" or path.suffix in (".png", ".md", ".csv") and \
                path.name.startswith("compare"):
            continue  # compare's table and plot show the times compare.json holds; compared there
        name = str(path.relative_to(run))
        if path.suffix == ".json":
            found[name] = _normalised(json.loads(path.read_text()))
        elif path.suffix == ".safetensors":  # the tensors and their names; the header's layout may differ
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                found[name] = {key: f.get_tensor(key).view(-1).view(torch.uint8).numpy().tobytes()
                               for key in sorted(f.keys())}
        else:
            found[name] = path.read_bytes()
    return found


def _parameters(run):
    written = tomllib.loads((run / "config.toml").read_text())
    written.pop("layershap")
    written.pop("out")
    return written


def _tiny(tiny_model_dir, long_text_file):
    return ["--model", tiny_model_dir, "--data", long_text_file]


def _eval(long_text_file):
    return ["--eval-data", long_text_file, "--eval-samples", 2, "--eval-seq-len", 32]


COMMANDS = {
    "estimate": lambda m, t: ["estimate", *_tiny(m, t), "--budget", 40, "--samples", 2, "--seq-len", 32,
                              "--seed", 5],
    "prune": lambda m, t: ["prune", *_tiny(m, t), "--ratio", 0.34, "--budget", 24, "--samples", 2, "--seq-len",
                           32, *_eval(t)],
    "compare": lambda m, t: ["compare", *_tiny(m, t), "--ratios", 0.34, "--methods", "shapley,last", "--budget",
                             24, "--samples", 2, "--seq-len", 32, *_eval(t)],
    "heal": lambda m, t: ["heal", *_tiny(m, t), "--steps", 2, "--samples", 4, "--seq-len", 32, "--batch-size", 2,
                          *_eval(t)],
    "quantize": lambda m, t: ["quantize", "--model", m, "--scheme", "int8", *_eval(t)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_run_reproduces_from_its_config_in_a_fresh_cache(command, capsys, monkeypatch, tmp_path, tiny_model_dir,
                                                           long_text_file):
    first, second = tmp_path / "A", tmp_path / "B"
    monkeypatch.setenv("LAYERSHAP_CACHE", str(tmp_path / "cache-a"))
    code, _, err = run_cli([*COMMANDS[command](tiny_model_dir, long_text_file), "--out", first], capsys)
    assert code == 0, err
    assert (first / "config.toml").is_file()
    monkeypatch.setenv("LAYERSHAP_CACHE", str(tmp_path / "cache-b"))  # nothing stored is reused
    code, _, err = run_cli([command, "--config", first / "config.toml", "--out", second], capsys)
    assert code == 0, err
    assert _parameters(second) == _parameters(first)
    a, b = _results(first), _results(second)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name


def test_estimate_without_target_writes_no_target(capsys, tmp_path, tiny_model_dir, long_text_file):
    """The bug: config.toml said target_ratio = 0.25 for a run that used no target."""
    code, _, err = run_cli([*COMMANDS["estimate"](tiny_model_dir, long_text_file), "--out", tmp_path / "A"], capsys)
    assert code == 0, err
    assert "target_ratio" not in tomllib.loads((tmp_path / "A" / "config.toml").read_text())
    assert json.loads((tmp_path / "A" / "shapley.json").read_text())["settings"]["target_removed"] is None
