"""GGUF in, GGUF out: the pruned file holds the kept blocks byte for byte, and what reads it (transformers,
llama.cpp) gets the model the blocks were chosen on, with those blocks skipped.

Nothing here trusts the writer: the expected tensors are derived from the input file with the gguf reader,
and the models are loaded by transformers itself (`from_pretrained(..., gguf_file=...)`)."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import run_cli
from gguf import GGUFReader, GGUFValueType
from tiny_gguf import write_tiny_gguf
from tiny_models import COMMON, VOCAB, tiny_model

from layershap.models.layers import keep_only
from layershap.transform.gguf_export import exportable_architectures, write_pruned_gguf

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import gguf_llama_cpp as llama_cpp

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))  # longer than the windows (8)


def load_gguf(path: Path):
    """transformers' own GGUF loader, dequantizing to float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def value(reader, key):
    field = reader.fields[key]
    return field.contents()


def assert_blocks_copied(source: Path, out: Path, removed: list[int]) -> None:
    """Every kept tensor is in `out` under its renumbered name with the original type, shape and bytes; every
    non-block tensor unchanged; nothing else."""
    a, b = GGUFReader(str(source)), GGUFReader(str(out))
    arch = value(a, "general.architecture")
    n = value(a, f"{arch}.block_count")
    kept = [i for i in range(n) if i not in removed]
    expected = {}
    for tensor in a.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk":
            if int(parts[1]) in removed:
                continue
            parts[1] = str(kept.index(int(parts[1])))
        expected[".".join(parts)] = tensor
    got = {tensor.name: tensor for tensor in b.tensors}
    assert sorted(got) == sorted(expected)
    for name, original in expected.items():
        copy = got[name]
        assert copy.tensor_type == original.tensor_type, name
        assert list(copy.shape) == list(original.shape), name
        assert copy.data.tobytes() == original.data.tobytes(), name
    assert value(b, f"{arch}.block_count") == len(kept)


def check_exact(source: Path, out: Path, removed: list[int], n: int) -> None:
    dense, pruned = load_gguf(source), load_gguf(out)
    assert pruned.config.num_hidden_layers == n - len(removed)
    with torch.no_grad():
        with keep_only(dense, [i for i in range(n) if i not in removed]):
            expected = dense(input_ids=IDS).logits
        got = pruned(input_ids=IDS).logits
    assert torch.equal(got, expected)


# -- tiny models of every family the export supports ---------------------------------------------------------

TINY = {
    "llama": lambda: tiny_model("llama"),
    "qwen2": lambda: tiny_model("qwen2"),
    # transformers reads no head_dim for qwen3 from a GGUF, so the file must use the default 128
    "qwen3": lambda: transformers.Qwen3Config(**{**COMMON, "num_attention_heads": 2, "num_key_value_heads": 1},
                                              head_dim=128),
    "phi3": lambda: tiny_model("phi3"),
    "gemma2": lambda: tiny_model("gemma2"),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 12}, head_dim=8,
                                                         sliding_window=8),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4),
    "starcoder2": lambda: transformers.Starcoder2Config(**COMMON),
    "mamba": lambda: tiny_model("mamba"),
}
# Gemma 3: transformers makes every sixth block (5, 11) full attention by position. This removal drops block 5
# and brings block 11 to position 5, so transformers reads the pruned file as the skipped model.
REMOVED = {"gemma3_text": [1, 3, 5, 6, 8, 10]}


def _tiny(model_type):
    made = TINY[model_type]()
    if isinstance(made, transformers.PretrainedConfig):
        torch.manual_seed(0)
        made = transformers.AutoModelForCausalLM.from_config(made).eval()
    return made


def test_every_exportable_architecture_is_tested_here():
    assert {"gemma3" if t == "gemma3_text" else t for t in TINY} | {"qwen2moe", "qwen3moe"} \
        == set(exportable_architectures())


@pytest.mark.parametrize("model_type", list(TINY))
def test_pruned_tiny_gguf_is_the_skipped_model_exactly(model_type, tmp_path):
    model = _tiny(model_type)
    n = model.config.num_hidden_layers
    source = write_tiny_gguf(model, tmp_path / "in.gguf")
    removed = REMOVED.get(model_type, [1, 2])
    info = write_pruned_gguf(source, tmp_path / "out.gguf", removed)
    assert info["kept"] == [i for i in range(n) if i not in removed] and info["notes"] == []
    assert_blocks_copied(source, tmp_path / "out.gguf", removed)
    assert Counter(t.tensor_type.name for t in GGUFReader(str(tmp_path / "out.gguf")).tensors)["Q8_0"] > 0
    check_exact(source, tmp_path / "out.gguf", removed, n)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sliding_window_pattern_follows_the_kept_blocks_for_llama_cpp(model_type, tmp_path):
    """llama.cpp places Gemma's sliding-window blocks by position unless the file lists them per block; when
    a removal moves them, the export lists them, as the skipped model has them."""
    model = tiny_model(model_type)
    source = write_tiny_gguf(model, tmp_path / "in.gguf")
    removed = [1] if model_type == "gemma2" else [1, 2]  # both shift a full-attention block's position
    info = write_pruned_gguf(source, tmp_path / "out.gguf", removed)
    dense = load_gguf(source)
    n = dense.config.num_hidden_layers
    period = 2 if model_type == "gemma2" else 6
    # the positional rule the export assumes is the one transformers applies to the original file
    assert [t == "sliding_attention" for t in dense.config.layer_types] == \
        [i % period < period - 1 for i in range(n)]
    with keep_only(dense, [i for i in range(n) if i not in removed]):
        expected = [t == "sliding_attention" for t in dense.config.layer_types]
    arch = "gemma3" if model_type == "gemma3_text" else model_type
    assert value(GGUFReader(str(tmp_path / "out.gguf")), f"{arch}.attention.sliding_window_pattern") == expected
    assert len(info["notes"]) == 1 and "transformers" in info["notes"][0]


def test_per_layer_metadata_arrays_are_sliced(tmp_path):
    A, U32, I32 = GGUFValueType.ARRAY, GGUFValueType.UINT32, GGUFValueType.INT32
    extra = {"llama.attention.head_count_kv": ([2, 2, 1, 2, 1, 2], (A, U32)),
             "llama.feed_forward_length": ([64, 64, 32, 64, 32, 16], (A, U32)),
             "llama.rope.dimension_sections": ([1, 2, 3, 4, 5, 6], (A, I32)),  # not per block
             "general.languages": (["en", "fr", "de", "es", "it", "nl"], (A, GGUFValueType.STRING)),
             "general.tags": (["tiny"], (A, GGUFValueType.STRING))}
    source = write_tiny_gguf(tiny_model("llama"), tmp_path / "in.gguf", extra_keys=extra)
    info = write_pruned_gguf(source, tmp_path / "out.gguf", [0, 4], {"method": "shortgpt", "forward_passes": 1,
                                                                    "ppl_before": {"wiki": 10.0},
                                                                    "ppl_after": {"wiki": 12.5}})
    out = GGUFReader(str(tmp_path / "out.gguf"))
    assert value(out, "llama.attention.head_count_kv") == [2, 1, 2, 2]
    assert value(out, "llama.feed_forward_length") == [64, 32, 64, 16]
    assert value(out, "llama.rope.dimension_sections") == [1, 2, 3, 4, 5, 6]
    assert value(out, "general.languages") == ["en", "fr", "de", "es", "it", "nl"]
    assert value(out, "general.tags") == ["tiny", "pruned", "layershap"]
    assert sorted(info["sliced_metadata"]) == ["llama.attention.head_count_kv", "llama.feed_forward_length"]
    assert value(out, "layershap.removed_blocks") == [0, 4]
    assert value(out, "layershap.kept_blocks") == [1, 2, 3, 5]
    assert value(out, "layershap.method") == "shortgpt" and value(out, "layershap.forward_passes") == 1
    assert value(out, "layershap.ppl_after.wiki") == 12.5 and value(out, "layershap.base_block_count") == 6
    source_reader = GGUFReader(str(source))
    for key in source_reader.fields:  # everything else carried over unchanged
        if not key.startswith("GGUF.") and key not in extra and key != "llama.block_count":
            assert value(out, key) == value(source_reader, key), key


def test_a_pruned_gemma_27b_is_flagged_for_llama_cpp(tmp_path):
    """llama.cpp infers Gemma 2 27B from its 46 blocks and scales attention for it; a pruned file cannot say."""
    source = _metadata_only_gguf(tmp_path / "g.gguf", "gemma2", blocks=46)
    info = write_pruned_gguf(source, tmp_path / "out.gguf", [3])
    assert any("Gemma 2 27B" in note and "attention scale" in note for note in info["notes"])
    assert not any("27B" in note for note in write_pruned_gguf(
        _metadata_only_gguf(tmp_path / "s.gguf", "gemma2", blocks=26), tmp_path / "s-out.gguf", [3])["notes"])


# -- the command line, on a tiny GGUF with a real tokenizer --------------------------------------------------

@pytest.fixture
def tiny_gguf(tmp_path, tiny_tokenizer):
    return write_tiny_gguf(tiny_model("qwen2"), tmp_path / "tiny-qwen2.gguf", tokenizer=tiny_tokenizer)


def _small(text):
    return ["--data", text, "--eval-data", text, "--samples", "2", "--seq-len", "32", "--eval-samples", "2",
            "--eval-seq-len", "32", "--device", "cpu"]


def test_cli_prunes_a_gguf_into_a_gguf_and_again_from_its_plan(tiny_gguf, sample_text_file, tmp_path, capsys):
    out = tmp_path / "run" / "pruned.gguf"
    code, stdout, err = run_cli(["prune", "--model", tiny_gguf, "--method", "shortgpt", "--ratio", "0.34",
                                 "--out", out, *_small(sample_text_file)], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "pruned.layershap.json").read_text())
    assert (tmp_path / "run" / "pruned.config.toml").is_file() and f"wrote {out}: 4 blocks" in stdout
    assert record["method"] == "shortgpt" and len(record["removed"]) == 2 and record["gguf"]["kept"] == record["kept"]
    assert_blocks_copied(tiny_gguf, out, record["removed"])
    check_exact(tiny_gguf, out, record["removed"], 6)
    reader = GGUFReader(str(out))
    assert value(reader, "layershap.removed_blocks") == record["removed"]
    assert value(reader, "layershap.method") == "shortgpt"
    assert value(reader, "layershap.forward_passes") == record["forward_passes"]
    text = str(sample_text_file)
    assert value(reader, "layershap.ppl_before.sample_txt") == record["ppl_before"][text]
    assert value(reader, "layershap.ppl_after.sample_txt") == record["ppl_after"][text]
    assert value(reader, "layershap.evaluation.sample_txt").startswith(f"{text}: 2 windows x 32 tokens")
    assert value(reader, "layershap.base_model") == tiny_gguf.name
    assert "pruned" in value(reader, "general.tags")
    assert value(reader, "tokenizer.ggml.merges") == value(GGUFReader(str(tiny_gguf)), "tokenizer.ggml.merges")

    again = tmp_path / "again.gguf"  # from the plan: same blocks, no choosing
    code, stdout, err = run_cli(["prune", "--model", tiny_gguf, "--plan", tmp_path / "run" / "pruned.layershap.json",
                                 "--out", again, *_small(sample_text_file)], capsys)
    assert code == 0, err
    replay = json.loads((tmp_path / "again.layershap.json").read_text())
    assert replay["removed"] == record["removed"] and replay["method"] == "shortgpt"
    assert replay["plan_file"].endswith("pruned.layershap.json") and "(plan from" in stdout
    assert_blocks_copied(out, again, [])  # the same file, tensor for tensor

    hf = tmp_path / "hf"  # a plan also writes a Hugging Face directory, with its model card
    code, stdout, err = run_cli(["prune", "--model", tiny_gguf, "--plan", out, "--out", hf,
                                 *_small(sample_text_file)], capsys)
    assert code == 0, err
    card = (hf / "README.md").read_text()
    assert card.startswith("---\n") and "- pruned\n- layershap\n" in card and "library_name: transformers" in card
    assert f"{record['removed']}" in card and "`shortgpt`" in card
    assert transformers.AutoModelForCausalLM.from_pretrained(hf).config.num_hidden_layers == 4


def _metadata_only_gguf(path, arch, *, blocks=4, extra=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", blocks)
    for key, val in (extra or {}).items():
        writer.add_uint32(key, val)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case, needle", [
    ("falcon", "cannot prune GGUF architecture 'falcon'"),  # transformers reads it; layershap has no entry
    ("olmo2", "cannot prune GGUF architecture 'olmo2'"),  # layershap has the family; transformers cannot read it
    ("split", "one part of a split GGUF"),
    ("directory", "a GGUF output needs a GGUF model"),
    ("quantize", "--quantize applies to a Hugging Face directory"),
    ("plan-mismatch", "was made for a model of 30 blocks; this model has 6"),
    ("no-ratio", "give --ratio"),
])
def test_cli_refuses_in_one_line(case, needle, tmp_path, capsys, tiny_model_dir, tiny_gguf, sample_text_file):
    model = {"falcon": lambda: _metadata_only_gguf(tmp_path / "f.gguf", "falcon"),
             "olmo2": lambda: _metadata_only_gguf(tmp_path / "o.gguf", "olmo2"),
             "split": lambda: _metadata_only_gguf(tmp_path / "s-00001-of-00002.gguf", "llama",
                                                  extra={"split.count": 2}),
             "directory": lambda: tiny_model_dir}.get(case, lambda: tiny_gguf)()
    args = ["prune", "--model", model, "--out", tmp_path / "out.gguf", *_small(sample_text_file)]
    if case == "quantize":
        args += ["--quantize", "int8"]
    if case == "plan-mismatch":
        (tmp_path / "plan.json").write_text(json.dumps({"n_layers": 30, "removed": [3, 4], "method": "x"}))
        args += ["--plan", tmp_path / "plan.json"]
    elif case != "no-ratio":
        args += ["--ratio", "0.25"]
    code, _, err = run_cli(args, capsys)
    if case == "plan-mismatch":  # found after loading, and transformers' GGUF loader draws a progress bar
        err = err.splitlines()[-1] + "\n"
    assert code == 2 and err.count("\n") == 1 and err.startswith("layershap: error: ") and needle in err, err
    assert not (tmp_path / "out.gguf").exists()


# -- the embedded default model: SmolLM2-135M-Instruct, Q4_1 -------------------------------------------------

SHORTGPT_REMOVED = [12, 13, 14, 15, 16, 17, 25, 26]  # what `prune --method shortgpt --ratio 0.25` removes


@pytest.fixture(scope="module")
def real_pruned(tmp_path_factory):
    """The embedded GGUF pruned as shortgpt prunes it, and the pruned file as transformers loads it."""
    from layershap.models.load import default_gguf_file

    source = default_gguf_file()
    out = tmp_path_factory.mktemp("gguf") / "pruned.gguf"
    write_pruned_gguf(source, out, SHORTGPT_REMOVED, {"method": "shortgpt", "forward_passes": 1})
    return source, out, load_gguf(out)


@pytest.mark.real_model
def test_default_model_pruned_to_22_q4_1_blocks_with_exact_logits(real_pruned, default_model):
    """`default_model` is transformers' float32 dequantization of the same GGUF (layershap caches it as
    safetensors on first use), so it is the in-memory model the blocks are chosen on."""
    source, out, pruned = real_pruned
    dense, _ = default_model
    assert_blocks_copied(source, out, SHORTGPT_REMOVED)
    types = Counter(t.tensor_type.name for t in GGUFReader(str(out)).tensors)
    assert types == {"Q4_1": 22 * 7, "F32": 22 * 2 + 1, "Q8_0": 1}  # 7 matrices per block, 2 norms; embedding
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with keep_only(dense, [i for i in range(30) if i not in SHORTGPT_REMOVED]):
            expected = dense(input_ids=ids).logits
        got = pruned(input_ids=ids).logits
    assert pruned.config.num_hidden_layers == 22 and torch.equal(got, expected)


@pytest.mark.real_model
def test_llama_cpp_runs_the_pruned_file_and_agrees_with_transformers(real_pruned, default_model, tmp_path):
    """llama.cpp's perplexity tool on the input and the pruned file, against the same protocol run in float by
    transformers: they differ only by llama.cpp's quantized arithmetic."""
    binary = llama_cpp.llama_cpp_bin()
    if binary is None:
        pytest.skip("llama.cpp's llama-perplexity is not built: run tools/build_llama_cpp.sh (or set "
                    "LLAMA_CPP_BIN) to run this check")
    source, out, pruned = real_pruned
    dense, tokenizer = default_model
    text_file = llama_cpp.write_text(tmp_path / "wiki.txt", 12_000)
    text = text_file.read_text()
    results = {}
    add_bos = llama_cpp.gguf_adds_bos(source)  # the tokenizer keys are carried over unchanged
    for name, path, model in (("in", source, dense), ("out", out, pruned)):
        theirs = llama_cpp.llama_perplexity(path, text_file, ctx=128, chunks=3, threads=1, binary_dir=binary)
        ours = llama_cpp.chunked_perplexity(model, tokenizer, text, ctx=128, chunks=3, add_bos=add_bos)
        assert theirs["chunks"] == ours["chunks"] == 3
        assert abs(math.log(theirs["ppl"] / ours["ppl"])) < 0.03, (name, theirs, ours)
        results[name] = theirs["ppl"], ours["ppl"]
    assert results["out"][0] > 1.5 * results["in"][0] and results["out"][1] > 1.5 * results["in"][1]
    assert np.isfinite(results["out"]).all()
