"""The repair stage: cuts, fitting, and folding that is exactly the hooked correction."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import tiny_model

from layershap.errors import LayershapError
from layershap.models.layers import prune_layers
from layershap.transform.repair import (
    Cut,
    check_repairable,
    dense_streams,
    fit_and_judge,
    fit_repair,
    fold_repair,
    removed_runs,
    repaired,
)

TOKENS = torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(0))


def tied_llama(dtype=torch.float64):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.model.embed_tokens.weight.data = model.lm_head.weight.data
    return model.to(dtype)


def test_removed_runs_name_the_kept_neighbours():
    assert removed_runs([1, 2, 4], 6) == [Cut(1, 2, before=0, after=1), Cut(4, 4, before=1, after=2)]
    assert removed_runs([0, 5], 6) == [Cut(0, 0, before=None, after=0), Cut(5, 5, before=3, after=None)]


@pytest.mark.parametrize("recipe", ["prunecomp", "scale", "replaceme-lstsq", "replaceme-cosine"])
def test_folded_repair_equals_the_hooked_one(recipe):
    """Folding the fitted corrections into the weights gives the logits of the model running them as hooks
    (float64, epsilon ~0: what remains is the float32 inside transformers' RMSNorm, ~1e-7)."""
    model = tied_llama()
    model.config.rms_norm_eps = 1e-30
    for block in model.model.layers:
        block.input_layernorm.variance_epsilon = block.post_attention_layernorm.variance_epsilon = 1e-30
    model.model.norm.variance_epsilon = 1e-30
    removed = [0, 2, 3]
    repair = fit_repair(model, removed, TOKENS, recipe)
    kinds = [f.kind for f in repair.fits]
    assert kinds[0] == "scale"  # a run at block 0: no block before it to fold a map into
    assert kinds[1] == ("map" if recipe.startswith("replaceme") else "scale")
    with torch.no_grad(), repaired(model, removed, repair):
        hooked = model(TOKENS).logits
    prune_layers(model, removed)
    with torch.no_grad():
        plain = model(TOKENS).logits
    touched = fold_repair(model, repair)
    with torch.no_grad():
        folded = model(TOKENS).logits
    assert touched
    assert (plain - hooked).abs().max() > 1e-3  # the repair does something
    torch.testing.assert_close(folded, hooked, rtol=1e-5, atol=1e-6)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


PLANS = [[1, 2], [0, 2, 3], [1, 3, 5], [0, 1, 4, 5], [2], [4, 5]]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("recipe", ["none", "scale", "prunecomp", "linearpatch"])
def test_resumed_fit_and_judgement_equal_the_plain_path(model_type, recipe):
    """Resuming each cut from the corrected stream of the one before (and the judgement from the last one) is a
    fast path: its fits and its NLL are the plain path's bit for bit, for runs at block 0, in the middle and at
    the end of the stack, with the dense streams traced per plan or once for all."""
    from layershap.game.nll import mean_nll

    model = tiny_model(model_type)
    n = len(model.model.layers)
    shared = dense_streams(model, range(n), TOKENS, 4, starts=range(n))
    for removed in PLANS:
        plain = fit_repair(model, removed, TOKENS, recipe, batch_size=4, resume=False)
        with repaired(model, removed, plain):
            expected = mean_nll(model, TOKENS, batch_size=4)
        for dense in (None, shared):
            fast, nll = fit_and_judge(model, removed, TOKENS, recipe, batch_size=4, dense=dense)
            assert [f.describe() for f in fast.fits] == [f.describe() for f in plain.fits]
            assert [f.scale for f in fast.fits] == [f.scale for f in plain.fits]
            for a, b in zip(fast.fits, plain.fits):
                assert (a.map is None) == (b.map is None) and (a.map is None or torch.equal(a.map, b.map))
            assert nll == expected, (removed, recipe)
        if recipe != "none" and removed[0] > 0 and len(removed_runs(removed, n)) > 1:  # later cuts resume
            assert fast.cost.token_passes < plain.cost.token_passes


def test_scale_fixes_magnitude_and_none_changes_nothing():
    model = tied_llama(torch.float32)
    removed = [1, 2]
    none = fit_repair(model, removed, TOKENS, "none")
    assert none.fits == [] and fold_repair(model, none) == []
    scale = fit_repair(model, removed, TOKENS, "scale")
    assert len(scale.fits) == 1 and scale.fits[0].scale > 0


def test_a_run_that_ends_the_stack_gets_no_scale():
    model = tied_llama(torch.float32)
    repair = fit_repair(model, [4, 5], TOKENS, "prunecomp")
    assert [f.kind for f in repair.fits] == ["none"]
    assert "final norm" in repair.fits[0].note
    lstsq = fit_repair(model, [4, 5], TOKENS, "replaceme-lstsq")
    assert [f.kind for f in lstsq.fits] == ["map"]


def test_repaired_model_saves_and_reloads_with_plain_transformers(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from layershap.models.save import save_pruned

    model = tied_llama(torch.float32)
    removed = [1, 3]
    repair = fit_repair(model, removed, TOKENS, "replaceme-lstsq")
    prune_layers(model, removed)
    count = sum(p.numel() for p in model.parameters())
    fold_repair(model, repair)
    assert sum(p.numel() for p in model.parameters()) == count
    with torch.no_grad():
        expected = model(TOKENS).logits
    save_pruned(model, tiny_tokenizer, tmp_path, {"repair": repair.describe()})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, expected, rtol=0, atol=0)


def test_repairs_refuse_what_they_cannot_fold():
    with pytest.raises(LayershapError, match="--repair"):
        check_repairable(tiny_model("gpt2"), "scale")
    with pytest.raises(LayershapError, match="sublayer"):
        check_repairable(tiny_model("llama"), "scale", granularity="sublayer")
    with pytest.raises(LayershapError, match="unknown --repair"):
        check_repairable(tiny_model("llama"), "magic")
    assert check_repairable(tiny_model("gpt2"), "none").name == "none"


# -- GGUF out: the touched tensors written into the file ------------------------------------------------------

@pytest.mark.parametrize("recipe", ["scale", "replaceme-lstsq"])
def test_repaired_gguf_is_the_repaired_model(recipe, tmp_path, tiny_tokenizer):
    """A scale goes into the Q8_0 block scales (the integers stay byte for byte); a map requantizes the one
    down projection it changes. transformers reading the file gets the in-memory repaired model, up to the
    float16 rounding of the block scales (a scale) or Q8_0 requantization (a map)."""
    import numpy as np
    import transformers
    from gguf import GGUFReader
    from tiny_gguf import write_tiny_gguf

    from layershap.transform.gguf_export import write_pruned_gguf
    from layershap.transform.gguf_repair import tensor_editor

    source = write_tiny_gguf(tiny_model("llama"), tmp_path / "in.gguf", tokenizer=tiny_tokenizer)

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32).eval()

    model, removed = load(source), [1, 2]
    repair = fit_repair(model, removed, TOKENS, recipe)
    prune_layers(model, removed)
    fold_repair(model, repair)
    report = {}
    write_pruned_gguf(source, tmp_path / "out.gguf", removed, edit_tensor=tensor_editor(repair, 4, report))
    if recipe == "replaceme-lstsq":  # the one map, into the down projection of kept block 0
        assert sorted(report) == ["blk.0.ffn_down.weight"] and report["blk.0.ffn_down.weight"]["map"]
        assert report["blk.0.ffn_down.weight"]["how"] == "requantized"
    else:  # the scale of the stream entering kept block 1, folded into it and every later writer
        assert sorted(report) == sorted(
            f"blk.{p}.{t}" for p in range(1, 4) for t in ("attn_output.weight", "ffn_down.weight"))
        before = {t.name: t for t in GGUFReader(str(source)).tensors}
        after = {t.name: t for t in GGUFReader(str(tmp_path / "out.gguf")).tensors}
        scaled = after["blk.2.attn_output.weight"]  # blk.2 of the output is blk.4 of the input
        blocks_in = before["blk.4.attn_output.weight"].data.reshape(-1, 34)
        blocks_out = scaled.data.reshape(-1, 34)
        assert scaled.tensor_type.name == "Q8_0"
        assert np.array_equal(blocks_in[:, 2:], blocks_out[:, 2:])  # the integers are untouched
        factor = report["blk.2.attn_output.weight"]["factor"]
        ratio = blocks_out[:, :2].copy().view(np.float16).astype(np.float64) / \
            blocks_in[:, :2].copy().view(np.float16).astype(np.float64)
        assert np.allclose(ratio, factor, rtol=2 ** -10)
    with torch.no_grad():
        expected = model(TOKENS).logits
        got = load(tmp_path / "out.gguf")(TOKENS).logits
    tolerance = 2e-3 if recipe == "scale" else 3e-2
    assert (got - expected).abs().max() < tolerance * expected.abs().max()


# -- the prune command ---------------------------------------------------------------------------------------

def _small(text):
    return ["--data", text, "--eval-data", text, "--samples", "2", "--seq-len", "32", "--eval-samples", "2",
            "--eval-seq-len", "32", "--device", "cpu", "--method", "shortgpt", "--ratio", "0.34"]


def test_prune_repairs_and_none_is_the_unrepaired_model(tiny_model_dir, sample_text_file, tmp_path, capsys):
    """No --repair means auto, which is scale on a llama; --repair none writes exactly the kept blocks."""
    from conftest import run_cli
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    runs = {}
    for name, extra in (("auto", ["--repair-samples", "4"]), ("none", ["--repair", "none"]),
                        ("scale", ["--repair", "scale", "--repair-samples", "4"])):
        code, out, err = run_cli(["prune", "--model", tiny_model_dir, "--out", tmp_path / name,
                                  *_small(sample_text_file), *extra], capsys)
        assert code == 0, err
        runs[name] = json.loads((tmp_path / name / "layershap.json").read_text())
        if name == "scale":
            assert "repaired (scale)" in out
    auto, none, scale = (load_file(tmp_path / n / "model.safetensors") for n in ("auto", "none", "scale"))
    assert all(torch.equal(auto[k], scale[k]) for k in scale) and "repair" not in runs["none"]
    pruned = prune_layers(AutoModelForCausalLM.from_pretrained(tiny_model_dir), runs["none"]["removed"])
    assert sorted(none) == sorted(pruned.state_dict())
    assert all(torch.equal(none[k], v) for k, v in pruned.state_dict().items())
    record = runs["scale"]
    assert record["removed"] == runs["none"]["removed"] and record["repair"]["recipe"] == "scale"
    assert record["repair"]["calibration"]["samples"] == 4 and record["repair"]["touched"]
    scaled = record["ppl_after"][str(sample_text_file)]
    assert scaled != runs["none"]["ppl_after"][str(sample_text_file)]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "scale")
    assert loaded.config.num_hidden_layers == 4


def test_auto_repair_is_none_where_no_repair_folds(tmp_path, sample_text_file, tiny_tokenizer, capsys):
    from conftest import run_cli

    path = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    code, out, err = run_cli(["prune", "--model", path, "--out", tmp_path / "out", *_small(sample_text_file)],
                             capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "layershap.json").read_text())
    assert record["repair"] == {"recipe": "none", "note": "no repair: it cannot be folded exactly into a gpt2 model"}
    assert "no repair" in out


def test_prune_refuses_a_repair_it_cannot_fold(tiny_model_dir, sample_text_file, tmp_path, capsys):
    from conftest import run_cli

    code, _out, err = run_cli(["prune", "--model", tiny_model_dir, "--out", tmp_path / "x", "--repair", "magic",
                              *_small(sample_text_file)], capsys)
    assert code == 2 and "unknown --repair 'magic'" in err and "Traceback" not in err


def test_finalists_are_judged_after_their_repair(tiny_tokenizer, sample_text_file):
    """choose_for_repair keeps the finalist whose repaired calibration NLL is lowest, measured as a user would
    measure it (the plan removed for good, its repair folded), and says what it cost."""
    from layershap.data.windows import text_windows
    from layershap.game.nll import mean_nll
    from layershap.plan.cost import Cost
    from layershap.plan.methods.base import Plan
    from layershap.transform.repair_choice import choose_for_repair

    windows = text_windows(str(sample_text_file), tiny_tokenizer, samples=4, seq_len=24)
    finalists = [[1, 2], [2, 3], [3, 4], [1, 4]]
    plan = Plan("shapley", 6, [1, 2], details={"finalists": finalists}, cost=Cost(passes=3, token_passes=30))
    chosen = choose_for_repair(tied_llama(torch.float32), plan, windows, "scale")
    report = chosen.details["repair_choice"]
    assert [r["remove"] for r in report["finalists"]] == finalists
    measured = {}
    for removal in finalists:
        model = tied_llama(torch.float32)
        repair = fit_repair(model, removal, windows.tokens, "scale")
        prune_layers(model, removal)
        fold_repair(model, repair)
        measured[tuple(removal)] = mean_nll(model, windows.tokens)
    for row in report["finalists"]:
        assert row["repaired_nll"] == pytest.approx(measured[tuple(row["remove"])], rel=1e-5)
    assert chosen.remove == list(min(measured, key=measured.get))
    assert chosen.cost.passes > 3 and chosen.cost.token_passes > 30 and -1 <= report["rank_agreement"] <= 1
    assert choose_for_repair(tied_llama(torch.float32), plan, windows, "none") is plan


def test_linearpatch_is_measured_with_a_hook_and_never_saved():
    from layershap.transform.repair import hadamard

    for d in (12, 32, 576):
        H = hadamard(d)
        torch.testing.assert_close(H @ H.T, torch.eye(d, dtype=torch.float64))
        assert torch.allclose(H.abs(), torch.full_like(H, d ** -0.5))
    model = tied_llama(torch.float32)
    repair = fit_repair(model, [1, 2], TOKENS, "linearpatch")
    assert [f.kind for f in repair.fits] == ["stream"]
    with torch.no_grad():
        with repaired(model, [1, 2], repair):
            patched = model(TOKENS).logits
        with repaired(model, [1, 2], fit_repair(model, [1, 2], TOKENS, "none")):
            plain = model(TOKENS).logits
    assert not torch.allclose(patched, plain)
    with pytest.raises(LayershapError, match="no weight of the model absorbs"):
        check_repairable(model, "linearpatch")


def test_repair_windows_fit_the_text(tiny_tokenizer, sample_text_file):
    """The repair's windows stay apart from the choice's; a short text gives fewer, and none at all None."""
    from layershap.data.windows import load_text, text_windows, tokenize, windows_apart

    calibration = text_windows(str(sample_text_file), tiny_tokenizer, samples=2, seq_len=24)
    apart = windows_apart(str(sample_text_file), tiny_tokenizer, calibration, 10_000)
    assert 1 <= apart.samples < 10_000
    taken = {start for _, start in calibration.starts}
    assert all(abs(start - other) >= 24 for _, start in apart.starts for other in taken)
    slots = len(tokenize(load_text(str(sample_text_file)), tiny_tokenizer)) // 2 // 24
    whole = text_windows(str(sample_text_file), tiny_tokenizer, samples=slots, seq_len=24)  # every window
    assert windows_apart(str(sample_text_file), tiny_tokenizer, whole, 4) is None


@pytest.mark.real_model
def test_llama_cpp_runs_the_repaired_default_gguf_as_transformers_does(default_model, tmp_path):
    """The default model without blocks 5 and 12-18, repaired with one scale per cut written into the Q4_1
    block scales: llama.cpp's perplexity of the file agrees with transformers' on the in-memory repaired model
    (same chunks), and both are below the unrepaired file's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import gguf_llama_cpp as llama_cpp

    from layershap.data.windows import text_windows
    from layershap.models.load import default_gguf_file
    from layershap.transform.gguf_export import write_pruned_gguf
    from layershap.transform.gguf_repair import tensor_editor

    binary = llama_cpp.llama_cpp_bin()
    if binary is None:
        pytest.skip("llama.cpp's llama-perplexity is not built: run tools/build_llama_cpp.sh (or set "
                    "LLAMA_CPP_BIN) to run this check")
    import copy

    dense, tokenizer = default_model
    model = copy.deepcopy(dense)
    removed = [5, 12, 13, 14, 15, 16, 17, 18]
    windows = text_windows("c4", tokenizer, samples=8, seq_len=128, seed=0)
    repair = fit_repair(model, removed, windows.tokens, "scale")
    prune_layers(model, removed)
    fold_repair(model, repair)
    report = {}
    out = tmp_path / "repaired.gguf"
    write_pruned_gguf(default_gguf_file(), out, removed, edit_tensor=tensor_editor(repair, 22, report))
    plain = tmp_path / "plain.gguf"
    write_pruned_gguf(default_gguf_file(), plain, removed)
    assert {entry["how"] for entry in report.values()} == {"block scales"}
    assert max(entry["max_scale_rounding"] for entry in report.values()) <= 2 ** -11
    text_file = llama_cpp.write_text(tmp_path / "wiki.txt", 12_000)
    add_bos = llama_cpp.gguf_adds_bos(default_gguf_file())
    theirs = llama_cpp.llama_perplexity(out, text_file, ctx=128, chunks=3, threads=1, binary_dir=binary)["ppl"]
    ours = llama_cpp.chunked_perplexity(model, tokenizer, text_file.read_text(), ctx=128, chunks=3,
                                        add_bos=add_bos)["ppl"]
    unrepaired = llama_cpp.llama_perplexity(plain, text_file, ctx=128, chunks=3, threads=1, binary_dir=binary)["ppl"]
    assert abs(math.log(theirs / ours)) < 0.03, (theirs, ours)
    assert theirs < unrepaired
