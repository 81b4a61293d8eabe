"""Write a pruned model as a checkpoint that plain `transformers` loads, with a record of what was done."""

from __future__ import annotations

from pathlib import Path

from layershap.io import write_json
from layershap.models.architectures import architecture_of


def save_pruned(model, tokenizer, out_dir, record: dict | None = None) -> Path:
    """`save_pretrained` the model and tokenizer into out_dir and write `layershap.json` beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key, value in architecture_of(model).save_config.items():
        setattr(model.config, key, value)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if record is not None:
        write_json(out / "layershap.json", record)
    return out
