"""Write a pruned model as a checkpoint that plain `transformers` loads, with a record of what was done."""

from __future__ import annotations

from pathlib import Path

from layershap.io import write_json
from layershap.models.layers import check_editable


def save_pruned(model, tokenizer, out_dir, record: dict | None = None) -> Path:
    """`save_pretrained` the model and tokenizer into out_dir and write `layershap.json` beside them.

    Refuses (like `prune_layers`) a model whose config lacks its family's `save_config` values: setting them
    only now could be too late (RWKV rescales its weights in place on its first inference pass).
    """
    check_editable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if record is not None:
        write_json(out / "layershap.json", record)
    return out


def inherited_record(model_name: str | None, model) -> dict:
    """The `layershap.json` of the directory a model was loaded from (so prune -> heal -> quantize keeps one
    history), or a fresh record naming the model; the version is always this layershap's."""
    from layershap import __version__
    from layershap.io import read_json
    from layershap.models.load import model_label

    record: dict = {}
    source = Path(model_name).expanduser() / "layershap.json" if model_name else None
    if source is not None and source.is_file():
        try:
            record = read_json(source)
        except ValueError:
            record = {}
    record.setdefault("model", model_label(model_name))
    record.setdefault("model_type", model.config.model_type)
    record["layershap_version"] = __version__
    return record
