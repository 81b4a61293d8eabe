"""Import paths from before the stage layout (layershap 0.1.0 had 24 flat modules), kept working.

An old module path (`layershap.store`) imports the module at its new place (`layershap.game.store`), the
very same module object, with a DeprecationWarning that names the new place. Names that moved out of a
module that still exists (`layershap.estimate.measurement_context`) are served by `moved_names`.
"""

from __future__ import annotations

import sys
import warnings
from importlib import import_module
from importlib.abc import Loader, MetaPathFinder
from importlib.util import spec_from_loader

MOVED_MODULES = {
    "layershap.cli_options": "layershap.cli.options",
    "layershap.cli_evaluate": "layershap.cli.evaluate",
    "layershap.cli_transform": "layershap.cli.transform",
    "layershap.cli_report": "layershap.cli.report",
    "layershap.backends": "layershap.game.backends",
    "layershap.backends.local": "layershap.game.backends.local",
    "layershap.backends.ray_backend": "layershap.game.backends.ray_backend",
    "layershap.backends.options": "layershap.cli.options",
    "layershap.store": "layershap.game.store",
    "layershap.evaluate.prefix": "layershap.game.prefix",
    "layershap.evaluate.tasks": "layershap.data.tasks",
    "layershap.sampling": "layershap.estimate.sampling",
    "layershap.surrogate": "layershap.estimate.surrogate",
    "layershap.shapley": "layershap.estimate.shapley",
    "layershap.search": "layershap.plan.search",
    "layershap.refine": "layershap.plan.refine",
    "layershap.seeds": "layershap.plan.seeds",
    "layershap.methods": "layershap.plan.methods",
    "layershap.methods.shapley": "layershap.plan.methods.cooperative_game",
    **{f"layershap.methods.{name}": f"layershap.plan.methods.{name}"
       for name in ("angular", "base", "last", "loo", "magnitude", "random_layers", "shapiq_estimators",
                    "shortgpt", "sleb", "taylor")},
    "layershap.quantize": "layershap.transform.quantize",
    "layershap.heal": "layershap.transform.heal",
    "layershap.compare": "layershap.evaluate.compare",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)


class _MovedModuleLoader(Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        # The import system returns whatever sys.modules holds under the name after exec_module.
        _warn(module.__name__, self.new)
        sys.modules[module.__name__] = import_module(self.new)


class _MovedModuleFinder(MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        new = MOVED_MODULES.get(fullname)
        return None if new is None else spec_from_loader(fullname, _MovedModuleLoader(new))


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())


def moved_names(module: str, here: str | None, moved: dict[str, str] | None = None):
    """A module-level `__getattr__`: names of `here` (a module of the same package) are served as they are;
    names in `moved` (name -> its new module) are served with a DeprecationWarning."""
    moved = moved or {}

    def __getattr__(name: str):
        if name in moved:
            _warn(f"{module}.{name}", f"{moved[name]}.{name}")
            return getattr(import_module(moved[name]), name)
        if here is not None and not name.startswith("__"):
            try:
                return getattr(import_module(here), name)
            except AttributeError:
                pass
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
