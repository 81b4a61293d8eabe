"""The write stage of `prune`: where the pruned model goes and in which form, decided and checked before any
work (`output_for`), and the writing itself (`write_output`).

Forms: a `save_pretrained` directory (quantized with torchao when `--quantize` ran; a model with single
sublayers removed carries layershap's modeling file), or a GGUF copied block by block from the GGUF the model
was loaded from (`gguf_export.py`; single sublayers removed: llama.cpp's deci, `gguf_sublayers.py`), its record
and config beside it (`pruned.layershap.json`, `pruned.config.toml`), or for a sublayer plan of a Llama-family
model a Nemotron-NAS (DeciLM) directory, the layout vLLM serves (`--format decilm`, `models/save_decilm.py`).
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
    granularity: str = "block"

    @property
    def config_path(self) -> Path:
        """Where the run's config.toml goes."""
        return gguf_sidecar(self.path, "config.toml") if self.format == "gguf" else self.path / "config.toml"


def output_for(out, out_format: str | None = None, *, model_name: str | None = None, model=None,
               quantize: str | None = None, granularity: str = "block") -> Output:
    """The checked output: a GGUF needs a GGUF source (and refuses --quantize; a sublayer plan needs one that
    llama.cpp's deci can hold); --quantize needs a model torchao can quantize (`model`, when given); an output
    that is the model being read is refused."""
    check_out_is_not_the_model(out, model_name)
    writes_gguf = wants_gguf(out, out_format)
    source = gguf_source(model_name, quantize, granularity) if writes_gguf else None
    if out_format == "decilm":
        check_decilm_output(model, quantize, granularity)
        return Output(Path(out), "decilm", None, None, granularity)
    if quantize is not None and model is not None:
        from layershap.transform.quantize import check_quantizable

        check_quantizable(model, quantize)
    return Output(Path(out), "gguf" if writes_gguf else "hf", source, quantize, granularity)


def check_decilm_output(model, quantize: str | None, granularity: str) -> None:
    """--format decilm: a sublayer plan of a Llama-family model, unquantized (`models/save_decilm.py`)."""
    from layershap.errors import LayershapError

    if granularity != "sublayer":
        raise LayershapError("--format decilm writes sublayer plans; add --granularity sublayer")
    if quantize is not None:
        raise LayershapError("--format decilm writes the weights unquantized; drop --quantize")
    if model is not None:
        from layershap.models.save_decilm import check_decilm

        check_decilm(model)


def gguf_source(model_name: str | None, quantize: str | None = None, granularity: str = "block") -> Path:
    """The GGUF a GGUF output is copied from, checked (`gguf_source_for`); for a sublayer plan also that
    llama.cpp's deci can hold its blocks."""
    source = gguf_source_for(model_name, quantize)
    if granularity == "sublayer":
        from layershap.transform.gguf_sublayers import check_sublayer_gguf_exportable

        check_sublayer_gguf_exportable(source)
    return source


def write_output(model, tokenizer, record: dict, output: Output, repair=None) -> dict:
    """Write the model and its record (`layershap.json`, and the model card for a directory); return the
    record as written (a GGUF adds what it copied, a quantized directory its sizes). `repair`: the fitted
    repair (`transform/repair.py`), already folded into `model`; a GGUF gets it written into the touched
    tensors (`gguf_repair.py`)."""
    if output.format == "gguf":
        editor, report = None, {}
        if repair is not None and repair.touched:
            from layershap.transform.gguf_repair import tensor_editor

            editor = tensor_editor(repair, record["n_layers"] - len(record["removed"]), report)
        record["gguf"] = _write_gguf(output, record, editor)
        if editor is not None:
            record["gguf"]["repaired_tensors"] = report
        write_json(gguf_sidecar(output.path, "layershap.json"), record)
        return record
    if output.format == "decilm":
        from layershap.models.save_decilm import save_decilm

        save_decilm(model, tokenizer, output.path, record)
        return record
    if output.quantize is None:
        save_pruned(model, tokenizer, output.path, record)
        return record
    from layershap.transform.quantize import save_quantized

    save_quantized(model, tokenizer, output.path, record)
    return read_json(output.path / "layershap.json")


def _write_gguf(output: Output, record: dict, editor=None) -> dict:
    """A block plan, or a sublayer plan that removes whole blocks only, keeps the input's architecture
    (`gguf_export.py`); a plan that removes single sublayers becomes llama.cpp's deci (`gguf_sublayers.py`).
    `editor`: a repair's tensor edits (block plans only: a repair is refused with sublayers)."""
    from layershap.transform.gguf_export import write_pruned_gguf

    if output.granularity != "sublayer":
        return write_pruned_gguf(output.gguf_source, output.path, record["removed"], record, edit_tensor=editor)
    from layershap.transform.gguf_sublayers import whole_blocks, write_sublayer_gguf

    blocks = whole_blocks(record["removed_sublayers"], record["n_layers"])
    if blocks is not None:
        return write_pruned_gguf(output.gguf_source, output.path, blocks, record)
    return write_sublayer_gguf(output.gguf_source, output.path, record["removed_sublayers"], record)
