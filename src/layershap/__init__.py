"""layershap: make a language model smaller by removing the layers that contribute least.

Layers are players in a cooperative game whose utility is the model's quality with only the kept layers;
a layer's worth is its Shapley value. The public API is imported lazily so that `layershap --version`
and `--help` stay instant (torch and transformers load on first use).
"""

from importlib import import_module

from layershap import _moved

__version__ = "0.1.0"

_PUBLIC = {
    "LayershapError": "layershap.errors",
    "load_model": "layershap.models.load",
    "architecture_of": "layershap.models.architectures",
    "num_layers": "layershap.models.layers",
    "keep_only": "layershap.models.layers",
    "prune_layers": "layershap.models.layers",
    "save_pruned": "layershap.models.save",
    "text_windows": "layershap.data.windows",
    "TextWindows": "layershap.data.windows",
    "mean_nll": "layershap.game.nll",
    "perplexity": "layershap.game.nll",
    "LayerGame": "layershap.game.layer_game",
    "UTILITIES": "layershap.game.layer_game",
    "Plan": "layershap.plan.methods.base",
    "METHODS": "layershap.plan.methods",
    "select_layers": "layershap.plan.methods",
}

__all__ = ["__version__", *_PUBLIC]  # noqa: PLE0604

_moved.install()  # old flat import paths (layershap.store, ...) still import, with a DeprecationWarning


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'layershap' has no attribute {name!r}")
