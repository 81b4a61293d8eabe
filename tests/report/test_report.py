"""`layershap report`: a self-contained page with every figure and table, for estimate, prune and compare
directories, checked in headless Chromium; bad directories end in one line and exit code 2."""

import base64
import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import run_cli

from layershap.report.html import PNG_FILES, REPORT_FILE

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _one_line_error(code, err, pattern):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def estimate_run(tmp_path_factory, tiny_model_dir, long_text_file):
    """One tiny real estimate run directory (with its config.toml), shared by the tests here."""
    from layershap.cli.app import main

    out = tmp_path_factory.mktemp("estimate") / "run"
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as done:
        patch.setenv("LAYERSHAP_CACHE", str(cache))
        main(["estimate", "--model", str(tiny_model_dir), "--data", str(long_text_file), "--samples", "4",
              "--seq-len", "32", "--budget", "20", "--target-ratio", "0.25", "--store", str(cache / "s.sqlite"), "--out", str(out)])
    assert done.value.code == 0
    return out


def _compare_dir(tmp_path, estimate_run):
    """A compare directory as `layershap compare --out` writes it (compare.json rows), one row carrying a
    Shapley estimate whose surrogate saved its held-out predictions."""
    estimate = json.loads((estimate_run / "shapley.json").read_text())
    estimate["surrogate"]["holdout"] = [{"measured": -5.0 - 0.1 * i, "predicted": -5.02 - 0.1 * i} for i in range(6)]
    texts = ["wiki", "c4"]

    def row(method, ratio, removed, ppl, **extra):
        return {"method": method, "ratio": ratio, "k": len(removed), "removed": removed,
                "kept": [i for i in range(6) if i not in removed], "ppl": dict(zip(texts, ppl)),
                "forward_passes": 0 if method == "dense" else 24, "seconds": 0.5, "scores": None, "details": {},
                **extra}

    record = {"model": "tiny-llama", "n_layers": 6, "methods": ["shapley", "shortgpt"], "ratios": [0.17, 0.34],
              "rows": [row("dense", 0.0, [], [20.0, 30.0]),
                       row("shapley", 0.17, [5], [21.0, 31.0], details={"estimate": estimate}),
                       row("shapley", 0.34, [0, 5], [25.0, 36.0]),
                       row("shortgpt", 0.17, [4], [23.0, float("inf")]),
                       row("shortgpt", 0.34, [3, 4], [40.0, 55.0])],
              "layershap_version": "0.1.0"}
    out = tmp_path / "compare"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps(record))
    (out / "config.toml").write_text('methods = "shapley,shortgpt"\n\n[layershap]\ncommand = "compare"\n'
                                     'command_line = "layershap compare --methods shapley,shortgpt --out compare"\n'
                                     'torch = "2.13.0"\ntransformers = "5.24.0"\nlayershap = "0.1.0"\n')
    return out


def _figures(page: str) -> dict[str, bytes]:
    found = re.findall(r'<img id="plot-([a-z]+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return {key: base64.b64decode(data) for key, data in found}


def _assert_self_contained(page: str):
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:|//)', page, re.IGNORECASE)
    assert "@import" not in page and "url(" not in page
    assert "<link" not in page.lower()


def test_estimate_report(capsys, estimate_run):
    code, out, err = run_cli(["report", estimate_run], capsys)
    assert code == 0, err
    assert f"wrote {estimate_run / REPORT_FILE}" in out
    page = (estimate_run / REPORT_FILE).read_text()
    _assert_self_contained(page)
    figures = _figures(page)
    assert set(figures) == {"shapley", "depth", "surrogate"}
    for key, png in figures.items():
        assert png.startswith(PNG_MAGIC) and (estimate_run / PNG_FILES[key]).read_bytes() == png
    assert not (estimate_run / PNG_FILES["ppl"]).exists()
    assert 'id="table-main"' in page and page.count("<tr>") >= 6 + 1
    fit = json.loads((estimate_run / "shapley.json").read_text())["surrogate"]
    assert len(fit["holdout"]) == fit["n_holdout"]  # the surrogate plot is drawn from these predictions
    assert "no held-out perplexity" in page
    assert "layershap estimate --config" in page and "transformers" in page and "--budget 20" in page


def test_prune_report_uses_the_methods_scores(capsys, tiny_model_dir, long_text_file, tmp_path):
    out = tmp_path / "pruned"
    code, _, err = run_cli(["prune", "--ratio", "0.34", "--method", "shortgpt", "--out", out, "--model",
                            tiny_model_dir, "--data", long_text_file, "--eval-data", long_text_file, "--samples", "4",
                            "--seq-len", "32", "--eval-samples", "2", "--eval-seq-len", "32"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["report", out], capsys)
    assert code == 0, err
    page = (out / REPORT_FILE).read_text()
    assert set(_figures(page)) == {"shapley", "depth", "ppl"}
    assert "shortgpt score" in page and "fits no surrogate" in page


def test_compare_report_renders_in_headless_chromium(capsys, estimate_run, tmp_path):
    if CHROMIUM is None:  # CI (.ci/run) sets LAYERSHAP_REQUIRE_CHROMIUM: there a missing browser is a failure
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("LAYERSHAP_REQUIRE_CHROMIUM"):
            pytest.fail(f"{message}, and LAYERSHAP_REQUIRE_CHROMIUM says this run must render the report")
        pytest.skip(message)
    run = _compare_dir(tmp_path, estimate_run)
    code, _, err = run_cli(["report", run], capsys)
    assert code == 0, err
    page_path = run / REPORT_FILE
    page = page_path.read_text()
    _assert_self_contained(page)
    assert set(_figures(page)) == set(PNG_FILES)
    assert all((run / name).read_bytes().startswith(PNG_MAGIC) for name in PNG_FILES.values())

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page_path.as_uri()], capture_output=True, text=True,
                         timeout=60, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-figures="4"' in body and 'data-figures-rendered="4"' in body, body  # every image decoded
    for element in ("plot-shapley", "plot-depth", "plot-surrogate", "plot-ppl", "table-main", "table-versions",
                    "commands"):
        assert f'id="{element}"' in dom.stdout, element
    table = re.search(r'<table id="table-main">(.*?)</table>', dom.stdout, re.DOTALL).group(1)
    assert table.count("<tr>") == 1 + 5 and "shortgpt" in table and "inf" in table
    assert "layershap compare --methods shapley,shortgpt" in dom.stdout

    shot = tmp_path / "page.png"
    taken = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,3000",
                            page_path.as_uri()], capture_output=True, text=True, timeout=60, check=False)
    assert taken.returncode == 0 and shot.read_bytes().startswith(PNG_MAGIC), taken.stderr[-2000:]
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few kB


def test_bad_run_directories(capsys, tmp_path):
    code, _, err = run_cli(["report", tmp_path / "missing"], capsys)
    _one_line_error(code, err, "does not exist")
    code, _, err = run_cli(["report", tmp_path], capsys)
    _one_line_error(code, err, "is not a layershap run directory")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["report", tmp_path / "file"], capsys)
    _one_line_error(code, err, "is not a directory")
    (tmp_path / "shapley.json").write_text("{broken")
    code, _, err = run_cli(["report", tmp_path], capsys)
    _one_line_error(code, err, "is not valid JSON")
    (tmp_path / "shapley.json").write_text('{"model": "x"}')
    code, _, err = run_cli(["report", tmp_path], capsys)
    _one_line_error(code, err, "is not a complete estimate record")
    (tmp_path / "bad.toml").write_text("dpi = 300\n")
    code, _, err = run_cli(["report", tmp_path, "--config", tmp_path / "bad.toml"], capsys)
    _one_line_error(code, err, "unknown key for `layershap report`: dpi")
