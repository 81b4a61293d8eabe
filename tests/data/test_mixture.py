"""Calibration mixtures (`c4,wiki,code`, `c4:2,wiki:1`) and fresh windows apart from given ones."""

import pytest
import torch

from layershap.data.windows import load_text, mixture_counts, parse_mixture, text_windows, tokenize
from layershap.errors import LayershapError


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    a, b = root / "a.txt", root / "b.txt"
    a.write_text(" ".join(f"alpha{i} beta gamma" for i in range(3000)))
    b.write_text(" ".join(f"zeta{i} eta theta" for i in range(3000)))
    return str(a), str(b)


def test_parse_mixture_forms():
    assert parse_mixture("c4") is None and parse_mixture("hf:c4") is None
    assert parse_mixture("c4,wiki,code") == [("c4", 1.0), ("wiki", 1.0), ("code", 1.0)]
    assert parse_mixture("c4:2,wiki:1") == [("c4", 2.0), ("wiki", 1.0)]
    assert parse_mixture("hf:c4:2,wiki") == [("hf:c4", 2.0), ("wiki", 1.0)]


@pytest.mark.parametrize("spec,message", [("c4:0,wiki", "weight"), ("c4:-1,wiki", "weight"), ("c4:,wiki", "weight"),
                                          ("c4:1e999,wiki", "weight"), ("c4,,wiki", "empty part"),
                                          ("c4,c4:2", "twice")])
def test_bad_mixtures_are_one_line_errors(spec, message, tiny_tokenizer):
    with pytest.raises(LayershapError, match=message) as error:
        text_windows(spec, tiny_tokenizer, samples=4, seq_len=16)
    assert "\n" not in str(error.value)


def test_unknown_part_is_named(tiny_tokenizer, two_files):
    with pytest.raises(LayershapError, match="unknown data 'nosuchtext'"):
        text_windows(f"{two_files[0]},nosuchtext", tiny_tokenizer, samples=4, seq_len=16)


def test_counts_follow_the_weights():
    assert mixture_counts([1, 1, 1], 8) == [3, 3, 2]
    assert mixture_counts([2, 1], 9) == [6, 3]
    assert sum(mixture_counts([3, 1, 1], 10)) == 10
    with pytest.raises(LayershapError, match="too few"):
        mixture_counts([1, 1, 1], 2)
    with pytest.raises(LayershapError, match="without a window"):
        mixture_counts([100, 1], 2)


def test_mixture_draws_each_part_from_its_calibration_half(tiny_tokenizer, two_files):
    a, b = two_files
    spec = f"{a}:3,{b}:1"
    w = text_windows(spec, tiny_tokenizer, samples=8, seq_len=16, seed=5)
    again = text_windows(spec, tiny_tokenizer, samples=8, seq_len=16, seed=5)
    other = text_windows(spec, tiny_tokenizer, samples=8, seq_len=16, seed=6)
    assert w.tokens.shape == (8, 16) and torch.equal(w.tokens, again.tokens) and w.fingerprint() == again.fingerprint()
    assert not torch.equal(w.tokens, other.tokens)
    assert [(name, count) for name, _, count in w.parts] == [(a, 6), (b, 2)]
    described = w.describe()
    assert described["source"] == f"{a}:3,{b}:1"
    assert [p["samples"] for p in described["mixture"]] == [6, 2]
    for (name, start), row in zip(w.starts, w.tokens):
        ids = tokenize(load_text(name), tiny_tokenizer)
        assert start + 16 <= len(ids) // 2
        assert torch.equal(torch.from_numpy(ids[start:start + 16]), row)
    # the part's rows are the part's own windows of the same seed
    alone = text_windows(a, tiny_tokenizer, samples=6, seq_len=16, seed=5)
    assert torch.equal(w.tokens[:6], alone.tokens)


def test_equal_weights_name_and_plain_text_unchanged(tiny_tokenizer, two_files):
    a, b = two_files
    w = text_windows(f"{a},{b}", tiny_tokenizer, samples=4, seq_len=16)
    assert w.source == f"{a},{b}" and "mixture" in w.describe()
    assert "mixture" not in text_windows(a, tiny_tokenizer, samples=4, seq_len=16).describe()


def test_fresh_windows_overlap_none_of_the_excluded(tiny_tokenizer, two_files):
    a, b = two_files
    spec = f"{a},{b}"
    cal = text_windows(spec, tiny_tokenizer, samples=20, seq_len=16, seed=0)
    fresh = text_windows(spec, tiny_tokenizer, samples=40, seq_len=32, seed=0, exclude=cal)
    assert fresh.split == "calibration"
    for name, start in fresh.starts:
        for other, taken in cal.starts:
            if other == name:
                assert start + 32 <= taken or start >= taken + 16
    with pytest.raises(LayershapError, match="too short"):
        text_windows(a, tiny_tokenizer, samples=10_000, seq_len=16, exclude=cal)
