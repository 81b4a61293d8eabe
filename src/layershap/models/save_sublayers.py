"""Save a model with single sublayers removed so that transformers loads it with `trust_remote_code=True`.

A plan that removes only whole blocks is saved by `save.save_pruned` as plain transformers. Otherwise the
directory gains layershap's own small modeling file (`remote/modeling_layershap.py.txt`, written with the
family's class name): a subclass of the family's `...ForCausalLM` that replaces the removed sublayers, listed
in the config, by identities; `auto_map` points `AutoModelForCausalLM` at it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from layershap.models.architectures import architecture_of
from layershap.models.save import save_pruned
from layershap.models.sublayers import REMOVED_KEY

MODELING_FILE = "modeling_layershap.py"
LAYOUT_KEY = "layershap_sublayers"


def save_sublayer_pruned(model, tokenizer, out_dir, record: dict | None = None) -> Path:
    """Save a model that `sublayers.remove_sublayers` edited; plain `save_pruned` when no single sublayer is
    removed."""
    removed = getattr(model.config, REMOVED_KEY, None) or []
    if not removed:
        return save_pruned(model, tokenizer, out_dir, record)
    arch = architecture_of(model)
    base = type(model).__name__
    layout = {"blocks": arch.blocks,
              "attn": {**asdict(arch.attention), "before": list(arch.attention.before),
                       "after": list(arch.attention.after)},
              "mlp": {**asdict(arch.mlp), "before": list(arch.mlp.before), "after": list(arch.mlp.after)}}
    model.config.update({LAYOUT_KEY: layout,
                         "auto_map": {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{base}"}})
    out = save_pruned(model, tokenizer, out_dir, record)
    template = (Path(__file__).parent / "remote" / f"{MODELING_FILE}.txt").read_text()
    (out / MODELING_FILE).write_text(template.replace("{base}", base))
    return out
