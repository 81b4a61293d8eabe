"""Sublayer plans as llama.cpp `deci` GGUFs: the kept tensors byte for byte, the per-block layout llama.cpp
reads, and a file that computes the skipped model.

Nothing here trusts the writer: the expected tensors come from the input file through the gguf reader; the
file's computation is checked by `deci_forward`, a transcription of llama.cpp's src/models/deci.cpp graph
(including its `n_ff == 0` branch, which skips the residual add) run on the file's own tensors, against
transformers' model of the input GGUF with the sublayers skipped by `keep_sublayers`; and, where llama.cpp is
built, by llama.cpp itself (perplexity, generation, KV cache size)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import run_cli
from gguf import GGUFReader
from gguf.quants import dequantize
from tiny_gguf import write_tiny_gguf
from tiny_models import VOCAB, tiny_model

from layershap.models.sublayers import keep_sublayers, sublayer_names
from layershap.transform.gguf_sublayers import whole_blocks, write_sublayer_gguf

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import gguf_llama_cpp as llama_cpp

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
# attention dropped in the first kept block (the zero "linear attention"), MLPs dropped (zero FFNs), block 3
# whole, and an attention dropped in a later block (deci's native n_head == 0)
REMOVED = ["attn.0", "mlp.1", "attn.3", "mlp.3", "attn.4", "mlp.5"]


def value(reader, key):
    return reader.fields[key].contents()


def mask_of(removed, n):
    return np.array([name not in removed for name in sublayer_names(n)])


def load_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for tensor in GGUFReader(str(path)).tensors:
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
        out[tensor.name] = torch.from_numpy(array.reshape([int(d) for d in reversed(tensor.shape)]))
    return out


def deci_forward(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's deci graph (src/models/deci.cpp) on the file's tensors, in float64: per-block head counts
    and FFN widths from the file, llama.cpp's "normal" RoPE (consecutive pairs), RMS norms."""
    reader = GGUFReader(str(path))
    heads, heads_kv = value(reader, "deci.attention.head_count"), value(reader, "deci.attention.head_count_kv")
    widths = value(reader, "deci.feed_forward_length")
    eps = value(reader, "deci.attention.layer_norm_rms_epsilon")
    base = value(reader, "deci.rope.freq_base") if "deci.rope.freq_base" in reader.fields else 10000.0
    w = weights(path)
    n_embd = w["token_embd.weight"].shape[1]
    head_dim = n_embd // heads[0]
    t = ids.shape[1]

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # (batch, heads, t, head_dim), pairs (2i, 2i+1)
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angle = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = angle.cos(), angle.sin()
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)

    x = w["token_embd.weight"][ids]
    for il in range(len(heads)):
        p = f"blk.{il}."
        inp_sa = x
        cur = x if heads[il] == 0 else norm(x, w[p + "attn_norm.weight"])
        if heads[il] > 0 and heads_kv[il] == 0:
            cur = cur @ w[p + "attn_output.weight"].T
        elif heads[il] > 0:
            q, k, v = ((cur @ w[p + m].T).view(ids.shape[0], t, h, head_dim).transpose(1, 2)
                       for m, h in (("attn_q.weight", heads[il]), ("attn_k.weight", heads_kv[il]),
                                    ("attn_v.weight", heads_kv[il])))
            rep = heads[il] // heads_kv[il]
            k, v = rope(k).repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            scores = rope(q) @ k.transpose(-1, -2) / math.sqrt(head_dim)
            scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), -math.inf)
            cur = (scores.softmax(-1) @ v).transpose(1, 2).reshape(ids.shape[0], t, -1) @ w[p + "attn_output.weight"].T
        if widths[il] == 0:
            continue  # as llama.cpp does: the block's output is dropped
        ffn_inp = cur + inp_sa if heads[il] > 0 else cur
        h = norm(ffn_inp, w[p + "ffn_norm.weight"])
        h = (torch.nn.functional.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T))
        x = h @ w[p + "ffn_down.weight"].T + ffn_inp
    head = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ head.T


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory):
    return write_tiny_gguf(tiny_model("llama"), tmp_path_factory.mktemp("deci") / "in.gguf")


def test_deci_file_holds_the_kept_tensors_and_the_per_block_layout(tiny_llama_gguf, tmp_path):
    out = tmp_path / "out.gguf"
    info = write_sublayer_gguf(tiny_llama_gguf, out, REMOVED, {"method": "shapley", "ratio": 0.25})
    a, b = GGUFReader(str(tiny_llama_gguf)), GGUFReader(str(out))
    assert value(b, "general.architecture") == "deci" and value(b, "deci.block_count") == 5
    assert info["kept"] == [0, 1, 2, 4, 5] and info["removed"] == [3]
    # block 0 keeps its MLP only (zero linear attention), 1 its attention (zero FFN), 4 its MLP, 5 its attention
    assert value(b, "deci.attention.head_count") == [4, 4, 4, 0, 4]
    assert value(b, "deci.attention.head_count_kv") == [0, 2, 2, 0, 2]
    assert value(b, "deci.feed_forward_length") == [64, 1, 64, 64, 1]
    assert info["zero_attention_blocks"] == [0] and info["zero_ffn_blocks"] == [1, 4]
    source = {t.name: t for t in a.tensors}
    got = {t.name: t for t in b.tensors}
    attn = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
    ffn = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    expected = {name: name for name in source if not name.startswith("blk.")}
    for new, (old, parts) in enumerate([(0, ffn), (1, attn), (2, attn + ffn), (4, ffn), (5, attn)]):
        expected.update({f"blk.{new}.{p}.weight": f"blk.{old}.{p}.weight" for p in parts})
    placeholders = {"blk.0.attn_norm.weight", "blk.0.attn_output.weight",
                    *(f"blk.{i}.{p}.weight" for i in (1, 4) for p in ffn)}
    assert sorted(got) == sorted([*expected, *placeholders])  # nothing of a dropped sublayer
    for name, original in expected.items():
        copy, src = got[name], source[original]
        assert copy.tensor_type == src.tensor_type and list(copy.shape) == list(src.shape), name
        assert copy.data.tobytes() == src.data.tobytes(), name
    for name in placeholders:
        data = np.asarray(got[name].data, dtype=np.float64)
        assert (data == 1).all() if "norm" in name else (data == 0).all(), name
    assert list(got["blk.1.ffn_down.weight"].shape) == [1, 32] and list(got["blk.1.ffn_gate.weight"].shape) == [32, 1]
    for key, field in a.fields.items():  # every other key carried, llama.* as deci.*
        if key.startswith("GGUF.") or key in ("general.architecture", "llama.block_count",
                                              "llama.attention.head_count", "llama.attention.head_count_kv",
                                              "llama.feed_forward_length"):
            continue
        assert value(b, key.replace("llama.", "deci.", 1)) == field.contents(), key
    assert value(b, "layershap.removed_sublayers") == REMOVED and value(b, "layershap.removed_blocks") == [3]
    assert value(b, "layershap.granularity") == "sublayer" and value(b, "layershap.zero_ffn_blocks") == [1, 4]
    assert info["placeholder_bytes"] == 2 * (16 * 32) + 4 * 32 + 2 * 32 * 32


def test_deci_file_computes_the_skipped_model(tiny_llama_gguf, tmp_path):
    """llama.cpp's deci graph, transcribed, on the written file gives the logits of transformers' model of the
    input file with the sublayers skipped; the same graph with an FFN width of 0 (what the Nemotron-NAS
    converter writes for a block without FFN) loses the attention of such a block."""
    out = tmp_path / "out.gguf"
    write_sublayer_gguf(tiny_llama_gguf, out, REMOVED)
    dense = load_gguf(tiny_llama_gguf)
    with torch.no_grad():
        with keep_sublayers(dense, mask_of(REMOVED, 6)):
            expected = dense(input_ids=IDS).logits.double()
        full = dense(input_ids=IDS).logits.double()
    got = deci_forward(out, IDS)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(full, expected, atol=1e-3)  # the skip mattered

    naive = tmp_path / "naive.gguf"  # block 1 written with n_ff = 0 and no FFN tensors
    _rewrite_width(out, naive, block=1)
    assert not torch.allclose(deci_forward(naive, IDS), expected, atol=1e-2)


def _rewrite_width(source: Path, out: Path, *, block: int) -> None:
    from gguf import GGUFValueType, GGUFWriter

    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(out), "deci")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        contents = field.contents()
        if key == "deci.feed_forward_length":
            contents[block] = 0
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, contents, field.types[0], field.types[-1])
        else:
            writer.add_key_value(key, contents, field.types[0])
    for tensor in reader.tensors:
        if not tensor.name.startswith(f"blk.{block}.ffn_"):
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_whole_block_plans_keep_the_input_architecture():
    assert whole_blocks(["attn.2", "mlp.2", "mlp.0", "attn.0"], 4) == [0, 2]
    assert whole_blocks(["attn.2"], 4) is None
    assert whole_blocks([], 4) == []


# -- the command line ----------------------------------------------------------------------------------------

def _small(text):
    return ["--data", text, "--eval-data", text, "--samples", "2", "--seq-len", "32", "--eval-samples", "2",
            "--eval-seq-len", "32", "--device", "cpu"]


def test_cli_writes_a_sublayer_plan_as_deci(tmp_path, tiny_tokenizer, sample_text_file, capsys):
    source = write_tiny_gguf(tiny_model("llama"), tmp_path / "tiny-llama.gguf", tokenizer=tiny_tokenizer)
    out = tmp_path / "run" / "pruned.gguf"
    code, stdout, err = run_cli(["prune", "--model", source, "--granularity", "sublayer", "--ratio", "0.25",
                                 "--budget", "40", "--out", out, *_small(sample_text_file)], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "pruned.layershap.json").read_text())
    removed = record["removed_sublayers"]
    assert record["gguf"]["removed_sublayers"] == removed and f"wrote {out} as llama.cpp's deci" in stdout
    reader = GGUFReader(str(out))
    assert whole_blocks(removed, 6) is None  # this plan drops single sublayers, so the file is deci
    assert value(reader, "general.architecture") == "deci"
    assert value(reader, "layershap.removed_sublayers") == removed
    dense = load_gguf(source)
    ids = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), keep_sublayers(dense, mask_of(removed, 6)):
        expected = dense(input_ids=ids).logits.double()
    assert torch.allclose(deci_forward(out, ids), expected, atol=1e-4, rtol=1e-4)


def test_cli_refuses_a_sublayer_gguf_of_another_architecture(tmp_path, tiny_tokenizer, sample_text_file, capsys):
    source = write_tiny_gguf(tiny_model("qwen2"), tmp_path / "tiny-qwen2.gguf", tokenizer=tiny_tokenizer)
    code, _, err = run_cli(["prune", "--model", source, "--granularity", "sublayer", "--ratio", "0.25",
                            "--out", tmp_path / "out.gguf", *_small(sample_text_file)], capsys)
    assert code == 2 and err.count("\n") == 1 and "deci architecture" in err and "'qwen2'" in err, err
    assert not (tmp_path / "out.gguf").exists()


# -- the embedded default model in llama.cpp -----------------------------------------------------------------

# a mixed plan on SmolLM2-135M: the first block's attention (the zero linear attention), attention-only blocks
# (zero FFNs), single attentions, and one block whole; 21.7% of the blocks' parameters
DEFAULT_REMOVED = ["attn.0", "mlp.13", "attn.14", "mlp.14", "attn.15", "mlp.16", "attn.17", "attn.18",
                   "mlp.19", "attn.20", "attn.21", "attn.22", "mlp.24", "attn.25", "attn.26", "attn.27"]


def _kv_mib(log: str) -> float:
    found = re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB", log)
    assert found, log[-2000:]
    return float(found[-1])


@pytest.mark.real_model
def test_llama_cpp_runs_the_deci_file_as_the_skipped_model(default_model, tmp_path):
    """llama.cpp's perplexity on the deci file against the same protocol in float on the dequantized input
    with the sublayers skipped; llama-completion generates from it; the KV cache llama.cpp allocates shrinks
    by the attentions removed (against a block plan of the same parameter share)."""
    binary = llama_cpp.llama_cpp_bin()
    if binary is None:
        pytest.skip("llama.cpp's llama-perplexity is not built: run tools/build_llama_cpp.sh (or set "
                    "LLAMA_CPP_BIN) to run this check")
    from layershap.models.load import default_gguf_file
    from layershap.transform.gguf_export import write_pruned_gguf

    source = default_gguf_file()
    out, blocks = tmp_path / "deci.gguf", tmp_path / "blocks.gguf"
    write_sublayer_gguf(source, out, DEFAULT_REMOVED)
    write_pruned_gguf(source, blocks, list(range(12, 20)))  # 8 blocks: the block plan of the same share
    dense, tokenizer = default_model
    text_file = llama_cpp.write_text(tmp_path / "wiki.txt", 12_000)
    with torch.no_grad(), keep_sublayers(dense, mask_of(DEFAULT_REMOVED, 30)):
        ours = llama_cpp.chunked_perplexity(dense, tokenizer, text_file.read_text(), ctx=128, chunks=3,
                                            add_bos=llama_cpp.gguf_adds_bos(source))
    theirs = llama_cpp.llama_perplexity(out, text_file, ctx=128, chunks=3, threads=1, binary_dir=binary)
    assert theirs["chunks"] == ours["chunks"] == 3
    assert abs(math.log(theirs["ppl"] / ours["ppl"])) < 0.02, (theirs, ours)

    def complete(path):
        result = subprocess.run([str(binary / "llama-completion"), "-m", str(path), "-p", "The capital of France",
                                 "-n", "8", "-c", "256", "-t", "1", "--temp", "0", "-no-cnv", "-v"],
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout, _kv_mib(result.stderr)

    text, kv = complete(out)
    _, kv_blocks = complete(blocks)
    _, kv_dense = complete(source)
    assert text.strip().startswith("The capital of France") and len(text.strip()) > len("The capital of France")
    attentions = 30 - sum(name.startswith("attn.") for name in DEFAULT_REMOVED)
    assert kv == pytest.approx(kv_dense * attentions / 30, rel=0.01) and kv < kv_blocks
