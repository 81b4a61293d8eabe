"""Shared fixtures: a tiny byte-level tokenizer and tiny random models, all built offline in seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import VOCAB, tiny_model

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
) * 40


def build_tiny_tokenizer(path: Path):
    """A byte-level BPE tokenizer with VOCAB entries, saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def sample_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sample.txt"
    path.write_text(SAMPLE_TEXT * 4)
    return path


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


REAL_MODEL_CACHE = Path(os.environ.get("LAYERSHAP_TEST_CACHE", Path(__file__).parents[1] / ".cache" / "tests"))


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run fastest on one thread (and several thrash when other processes share the cores); the
    real 135M model keeps torch's default."""
    if request.node.get_closest_marker("real_model") is not None:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Each test gets its own empty cache; tests marked real_model share one, so the embedded default model
    is converted from GGUF once per machine rather than once per test."""
    real = request.node.get_closest_marker("real_model") is not None
    monkeypatch.setenv("LAYERSHAP_CACHE", str(REAL_MODEL_CACHE if real else tmp_path / "cache"))


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M (30 layers), loaded once for the session."""
    import layershap

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAYERSHAP_CACHE", str(REAL_MODEL_CACHE))
        return layershap.load_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama saved with its tokenizer, loadable by `--model DIR`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


SUBLAYERS_REMOVED = ("attn.0", "mlp.2", "attn.3", "mlp.3", "attn.5")  # single ones, and block 3 whole


@pytest.fixture(scope="session")
def sublayer_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama with single sublayers removed, saved as `prune --granularity sublayer` saves it:
    layershap's modeling file, `auto_map`, tokenizer and a record."""
    import numpy as np

    from layershap.models.save import save_pruned
    from layershap.models.sublayers import remove_sublayers, sublayer_names

    path = tmp_path_factory.mktemp("tiny-llama-sublayers")
    mask = np.array([name not in SUBLAYERS_REMOVED for name in sublayer_names(6)])
    model = remove_sublayers(tiny_model("llama"), mask)
    record = {"model": "tiny-llama", "model_type": "llama", "n_layers": 6, "granularity": "sublayer",
              "removed": list(SUBLAYERS_REMOVED), "removed_sublayers": list(SUBLAYERS_REMOVED)}
    save_pruned(model, tiny_tokenizer, path, record)
    return path


@pytest.fixture(scope="session")
def long_text_file(tmp_path_factory):
    """Enough varied text for a few hundred windows of the tiny tokenizer."""
    words = SAMPLE_TEXT.split()
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "long.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(30000)))
    return path


def run_cli(args, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from layershap.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def run_cli_quietly(argv) -> tuple[int, str]:
    """Run the CLI in-process without capsys (for loops and hypothesis); return (exit code, stderr). A
    SystemExit without a code is 0, one with a message 1, as the interpreter would exit."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from layershap.cli.app import main

    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            return (exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)), err.getvalue()
    return 0, err.getvalue()


def error_lines(err: str) -> list[str]:
    """stderr's lines (split at newlines only: `str.splitlines` also splits at characters such as \x1e that a
    message may quote from the user's input) but progress bars (layershap's, and lm-eval's tqdm, which an
    error can interrupt mid-line: the error then starts where the bar stopped)."""
    lines = [line[line.index("layershap: "):] if "layershap: " in line else line for line in err.split("\n")]
    return [line for line in lines if line.strip() and "━" not in line and "%|" not in line]
