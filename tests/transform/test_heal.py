"""Healing: LoRA steps lower the training loss, the adapters merge into plain weights that reload with plain
transformers (no PEFT module left), and bad input ends in one line and exit 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from conftest import run_cli
from tiny_models import VOCAB, tiny_model

from layershap.errors import LayershapError
from layershap.models.architectures import architecture_of
from layershap.models.save import save_pruned
from layershap.transform.heal import heal_model, lora_targets

pytest.importorskip("peft")



def _one_line_error(code, err, pattern):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


def _no_peft_left(model):
    assert not [k for k in model.state_dict() if "lora" in k or "base_layer" in k]
    assert not [n for n, m in model.named_modules() if type(m).__module__.startswith("peft")]


def test_heal_command_lowers_loss_and_saves_a_plain_model(capsys, tiny_model_dir, long_text_file, tmp_path):
    code, out, err = run_cli(["heal", "--model", tiny_model_dir, "--data", long_text_file, "--steps", 8,
                              "--lr", "1e-2", "--samples", 8, "--seq-len", 32, "--batch-size", 2,
                              "--eval-data", long_text_file, "--eval-samples", 2, "--eval-seq-len", 32,
                              "--out", tmp_path / "healed"], capsys)
    assert code == 0, err
    assert "training loss" in out and "perplexity" in out
    record = json.loads((tmp_path / "healed" / "layershap.json").read_text())
    heal = record["heal"]
    assert (heal["steps"], heal["lr"], heal["rank"], heal["alpha"]) == (8, 1e-2, 8, 16.0)
    assert heal["target_layers"] == 6 * 7 and heal["calibration"]["split"] == "calibration"
    losses = heal["losses"]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 and losses[-1] < losses[0]
    name = str(long_text_file)
    assert heal["ppl_after"][name] < heal["ppl_before"][name]
    card = (tmp_path / "healed" / "README.md").read_text()
    assert "- layershap\n- lora-healed\n" in card and "Healed with LoRA (rank 8, 8 steps)" in card

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    _no_peft_left(reloaded)
    assert sorted(reloaded.state_dict()) == sorted(original.state_dict())
    assert not torch.equal(reloaded.model.layers[2].mlp.up_proj.weight, original.model.layers[2].mlp.up_proj.weight)
    torch.testing.assert_close(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)

    code, out, err = run_cli(["ppl", "--model", tmp_path / "healed", "--data", long_text_file, "--samples", 2,
                              "--seq-len", 32, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["ppl"][name] == pytest.approx(heal["ppl_after"][name], rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "mamba", "rwkv"])
def test_heal_other_families_merges_and_reloads(family, tmp_path):
    model = tiny_model(family)
    for key, value in architecture_of(model).save_config.items():
        setattr(model.config, key, value)
    targets, conv1d = lora_targets(model)
    assert conv1d == (family == "gpt2") and targets
    if family == "mamba":  # dt_proj is read directly; PEFT refuses out_proj
        assert {t.rsplit(".", 1)[-1] for t in targets} == {"in_proj", "x_proj"}
    tokens = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    healed, stats = heal_model(model, tokens, steps=3, lr=1e-2, batch_size=2, progress=False)
    assert len(stats["losses"]) == 3 and all(math.isfinite(v) for v in stats["losses"])
    _no_peft_left(healed)
    ids = tokens[:1]
    with torch.no_grad():
        expected = healed(ids).logits
    save_pruned(healed, None, tmp_path / family)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


def test_bad_heal_input(capsys, tiny_model_dir, long_text_file, tmp_path):
    _one_line_error(*run_cli(["heal", "--steps", 0, "--out", tmp_path / "h"], capsys)[::2],
                    "--steps must be at least 1")
    _one_line_error(*run_cli(["heal", "--rank", 0, "--out", tmp_path / "h"], capsys)[::2], "--rank")

    pytest.importorskip("torchao")
    from layershap.transform.quantize import quantize_model, save_quantized

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    save_quantized(quantize_model(model, "int8"), None, tmp_path / "q")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "q" / name).write_bytes((tiny_model_dir / name).read_bytes())
    capsys.readouterr()  # saving may print a progress bar
    code, _, err = run_cli(["heal", "--model", tmp_path / "q", "--data", long_text_file, "--steps", 2,
                            "--out", tmp_path / "h"], capsys)
    _one_line_error(code, err, "quantized")
    with pytest.raises(LayershapError, match="quantized"):
        heal_model(model, torch.zeros((2, 8), dtype=torch.long), steps=1, progress=False)
