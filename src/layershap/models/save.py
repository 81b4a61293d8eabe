"""Write a pruned model as a checkpoint that plain `transformers` loads, with a record of what was done.

A model with single attention or MLP sublayers removed gets layershap's own modeling file beside its weights
(`save_sublayers.py`): every command that saves (prune, heal, quantize) goes through `save_pruned`, so a
sublayer-pruned model stays loadable after healing or quantizing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from layershap.errors import LayershapError
from layershap.io import read_json, save_pretrained, write_json
from layershap.models.architectures import architecture_of
from layershap.models.card import write_model_card
from layershap.models.layers import check_editable
from layershap.models.save_sublayers import MODELING_FILE, mark_remote_code
from layershap.models.stream import streamer_of


def save_pruned(model, tokenizer, out_dir, record: dict | None = None, *, keep_checkpoint_dtype: bool = True) -> Path:
    """`save_pretrained` the model and tokenizer into out_dir and write `layershap.json` and a model card
    (`README.md`, `models/card.py`) from `record` beside them. A model with single sublayers removed also
    gets layershap's modeling file and the config's `auto_map` (it then loads with trust_remote_code).

    A model that `load_model` widened to float32 (the CPU default) is written in its checkpoint's own
    precision again (`saved_dtype`): a bfloat16 checkpoint pruned on a laptop must not come back at twice its
    size. The model in memory is left as it is. `keep_checkpoint_dtype=False` writes the tensors as they are
    (quantized models: torchao's tensors must not be cast).

    Refuses (like `prune_layers`) a model whose config lacks its family's `save_config` values: setting them
    only now could be too late (RWKV rescales its weights in place on its first inference pass).
    """
    check_editable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remote_code = mark_remote_code(model)
    dtype = saved_dtype(model) if keep_checkpoint_dtype else None
    if streamer_of(model) is not None:  # never held whole: its kept blocks copied from the source shards
        _save_streamed(model, out, remote_code)
    elif dtype is None:
        save_pretrained(model, out)
    else:
        state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                 for name, tensor in model.state_dict().items()}
        save_pretrained(model, out, state_dict=state)
        _write_config_dtype(out, dtype)  # save_pretrained writes the dtype of the model in memory
    if remote_code is not None:  # transformers copies a remote-code model's file too; ours is written anyway
        (out / MODELING_FILE).write_text(remote_code)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if record is not None:
        write_json(out / "layershap.json", record)
        write_model_card(out, record)
    return out


def _save_streamed(model, out: Path, remote_code) -> None:
    from layershap.models.layers import block_list
    from layershap.models.stream_save import save_streamed

    if remote_code is not None:
        raise LayershapError("a streamed model with single sublayers removed cannot be saved; load it whole "
                             "(--offload none) to prune it by sublayer")
    streamer = streamer_of(model)
    save_streamed(streamer.index.directory, out, streamer.positions_of(block_list(model)), architecture_of(model))


def saved_dtype(model) -> torch.dtype | None:
    """The narrower dtype to write a float32 model in: its checkpoint's half-precision dtype, recorded by
    `load_model`; None (write as it is) for anything else."""
    from layershap.models.load import CHECKPOINT_DTYPE_ATTR

    stored = getattr(model, CHECKPOINT_DTYPE_ATTR, None)
    running = next(model.parameters()).dtype
    return stored if running == torch.float32 and stored in (torch.bfloat16, torch.float16) else None


def _write_config_dtype(out: Path, dtype: torch.dtype) -> None:
    path = out / "config.json"
    config = read_json(path)
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:  # the key's name before transformers 4.56
        config["torch_dtype"] = name
    write_json(path, config)


def inherited_record(model_name: str | None, model) -> dict:
    """The `layershap.json` of the directory a model was loaded from (so prune -> heal -> quantize keeps one
    history), or a fresh record naming the model; the version is always this layershap's."""
    from layershap import __version__
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
