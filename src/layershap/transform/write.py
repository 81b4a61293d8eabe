"""The write stage of `prune`: where the pruned model goes and in which form, decided and checked before any
work (`output_for`), and the writing itself (`write_output`).

Forms: a `save_pretrained` directory (quantized with torchao when `--quantize` ran; a model with single
sublayers removed carries layershap's modeling file), or a GGUF copied block by block from the GGUF the model
was loaded from (`gguf_export.py`), its record and config beside it (`pruned.layershap.json`,
`pruned.config.toml`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layershap.io import check_out_is_not_the_model, gguf_sidecar, read_json, write_json
from layershap.models.save import save_pruned
from layershap.transform.gguf_export import gguf_source_for, wants_gguf


@dataclass(frozen=True)
class Output:
    """path: the directory or .gguf file; gguf_source: the GGUF file the kept blocks are copied from (GGUF
    outputs only); quantize: the torchao scheme the model was quantized with before writing, if any."""

    path: Path
    format: str
    gguf_source: Path | None = None
    quantize: str | None = None

    @property
    def config_path(self) -> Path:
        """Where the run's config.toml goes."""
        return gguf_sidecar(self.path, "config.toml") if self.format == "gguf" else self.path / "config.toml"


def output_for(out, out_format: str | None = None, *, model_name: str | None = None, model=None,
               quantize: str | None = None) -> Output:
    """The checked output: a GGUF needs a GGUF source (and refuses --quantize); --quantize needs a model
    torchao can quantize (`model`, when given); an output that is the model being read is refused."""
    check_out_is_not_the_model(out, model_name)
    writes_gguf = wants_gguf(out, out_format)
    source = gguf_source_for(model_name, quantize) if writes_gguf else None
    if quantize is not None and model is not None:
        from layershap.transform.quantize import check_quantizable

        check_quantizable(model, quantize)
    return Output(Path(out), "gguf" if writes_gguf else "hf", source, quantize)


def write_output(model, tokenizer, record: dict, output: Output, repair=None) -> dict:
    """Write the model and its record (`layershap.json`, and the model card for a directory); return the
    record as written (a GGUF adds what it copied, a quantized directory its sizes). `repair`: the fitted
    repair (`transform/repair.py`), already folded into `model`; a GGUF gets it written into the touched
    tensors (`gguf_repair.py`)."""
    if output.format == "gguf":
        from layershap.transform.gguf_export import write_pruned_gguf

        editor, report = None, {}
        if repair is not None and repair.touched:
            from layershap.transform.gguf_repair import tensor_editor

            editor = tensor_editor(repair, record["n_layers"] - len(record["removed"]), report)
        record["gguf"] = write_pruned_gguf(output.gguf_source, output.path, record["removed"], record,
                                           edit_tensor=editor)
        if editor is not None:
            record["gguf"]["repaired_tensors"] = report
        write_json(gguf_sidecar(output.path, "layershap.json"), record)
        return record
    if output.quantize is None:
        save_pruned(model, tokenizer, output.path, record)
        return record
    from layershap.transform.quantize import save_quantized

    save_quantized(model, tokenizer, output.path, record)
    return read_json(output.path / "layershap.json")
