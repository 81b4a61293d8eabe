"""layershap's own modeling file for a model with single sublayers removed, and how a directory is told to be
one of ours.

A plan that removes only whole blocks is saved as plain transformers. Otherwise `save.save_pruned` writes
beside the weights layershap's small modeling file (`remote/modeling_layershap.py.txt`, rendered with the
family's class name): a subclass of the family's `...ForCausalLM` that replaces the removed sublayers, listed
in the config, by identities; `auto_map` points `AutoModelForCausalLM` at it, so plain transformers loads the
directory with `trust_remote_code=True`.

Loading such a directory without remote code is silently wrong: transformers falls back to the family's own
class, which rebuilds the removed sublayers with random weights. So `load.load_model` trusts a directory whose
modeling file is, byte for byte, the one this layershap writes (`own_remote_code`) without being asked, and
refuses in one line one whose file differs unless --trust-remote-code is given: that file is not ours.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from layershap.models.architectures import architecture_of
from layershap.models.sublayers import REMOVED_KEY

MODELING_FILE = "modeling_layershap.py"
DECI_FILE = "modeling_layershap_decilm.py"  # the Nemotron-NAS layout of a Llama-family plan (save_decilm.py)
LAYOUT_KEY = "layershap_sublayers"
AUTO_CLASS = "AutoModelForCausalLM"


def modeling_source(base: str) -> str:
    """The modeling file this layershap writes for a family whose causal-LM class is `base`."""
    template = (Path(__file__).parent / "remote" / f"{MODELING_FILE}.txt").read_text()
    return template.replace("{base}", base)


def decilm_source() -> str:
    """The config and modeling file of a DeciLM directory this layershap writes."""
    return (Path(__file__).parent / "remote" / f"{DECI_FILE}.txt").read_text()


def mark_remote_code(model) -> str | None:
    """For a model that `sublayers.remove_sublayers` edited: put the block layout and `auto_map` in its config
    and return the modeling file to write beside it; None (nothing changed) when no single sublayer is
    removed, since such a model saves as plain transformers."""
    if not getattr(model.config, REMOVED_KEY, None):
        return None
    arch = architecture_of(model)
    base = type(model).__name__
    layout = {"blocks": arch.blocks,
              "attn": {**asdict(arch.attention), "before": list(arch.attention.before),
                       "after": list(arch.attention.after)},
              "mlp": {**asdict(arch.mlp), "before": list(arch.mlp.before), "after": list(arch.mlp.after)}}
    model.config.update({LAYOUT_KEY: layout, "auto_map": {AUTO_CLASS: f"{MODELING_FILE[:-3]}.{base}"}})
    return modeling_source(base)


def own_remote_code(directory) -> bool | None:
    """Whether a model directory's remote code is layershap's own: None when its config does not point
    `AutoModelForCausalLM` at layershap's modeling file; True when that file is exactly the one this layershap
    writes for the class named; False when it is missing or differs (an older layershap, or edited)."""
    path = Path(directory).expanduser()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    target = (config.get("auto_map") or {}).get(AUTO_CLASS) if isinstance(config, dict) else None
    module, _, base = target.partition(".") if isinstance(target, str) else ("", "", "")
    if module == DECI_FILE[:-3]:
        try:
            return (path / DECI_FILE).read_text() == decilm_source()
        except (OSError, UnicodeDecodeError):
            return False
    if module != MODELING_FILE[:-3]:
        return None
    if not base.isidentifier():  # the name is written into the file: only a plain class name renders safely
        return False
    try:
        return (path / MODELING_FILE).read_text() == modeling_source(base)
    except (OSError, UnicodeDecodeError):
        return False
