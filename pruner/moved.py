"""Module paths of pruner 0.1 that moved into the stage packages: they still import, with a
``DeprecationWarning`` naming the new place, until pruner 0.3.

An old module is a stand-in whose attributes are looked up, on first use, in the modules that
now hold them (``pruner.api.prune`` is ``pruner.loop.prune``). Names that kept their module
(``pruner.config``, ``pruner.errors``, ``pruner.checks``, ``pruner.memory``, the packages
``pruner.data``, ``pruner.io``, ``pruner.importance``, ``pruner.selection``, ``pruner.eval``,
``pruner.callbacks``, ``pruner.lightning_modules``) need no stand-in.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     from pruner.api import prune
    >>> prune.__module__, "pruner.loop" in str(caught[0].message)
    ('pruner.loop.prune', True)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED: dict[str, tuple[str, ...]] = {  # old module -> the modules that hold its names now, searched in order
    "pruner.api": ("pruner.loop", "pruner.batches", "pruner.refit.statistics", "pruner.structure", "pruner.version"),
    "pruner.pipeline": ("pruner.loop.steps", "pruner.version"),
    "pruner.discovery": ("pruner.structure.discovery", "pruner.structure.groups"),
    "pruner.plan": ("pruner.structure.plan", "pruner.structure.params"),
    "pruner.surgery": ("pruner.structure.surgery",),
    "pruner.export_shapes": ("pruner.structure.shapes",),
    "pruner.aggregation": ("pruner.importance.aggregation",),
    "pruner.refine": ("pruner.selection.measured", "pruner.structure.groups"),
    "pruner.reconstruction": ("pruner.refit.statistics", "pruner.refit.least_squares", "pruner.refit.obs"),
    "pruner.regional": ("pruner.refit.regional",),
    "pruner.sharding": ("pruner.distributed.dtensor", "pruner.distributed.gather"),
    "pruner.models": ("pruner.io.models",),
    "pruner.hub": ("pruner.data.hub",),
    "pruner.generated": ("pruner.data.generated",),
    "pruner.gguf_export": ("pruner.io.gguf",),
    "pruner.lora": ("pruner.recovery.lora",),
    "pruner.distillation": ("pruner.recovery.distillation",),
    "pruner.eval.testing": ("pruner.testing",),
    "pruner.lightning_modules.testing": ("pruner.testing",),
}
REMOVAL = "0.3"


class MovedModule(types.ModuleType):
    """An old module path: each attribute is the one of the first new module that has it."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for new in MOVED[self.__name__]:
            module = importlib.import_module(new)
            if hasattr(module, name):
                value = getattr(module, name)
                setattr(self, name, value)  # found once
                return value
        raise AttributeError(f"{self.__name__} moved to {', '.join(MOVED[self.__name__])}, which have no {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for new in MOVED[self.__name__] for n in dir(importlib.import_module(new))
                       if not n.startswith("_")})


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths of :data:`MOVED` (after every other finder: no real module there)."""

    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return MovedModule(spec.name)

    def exec_module(self, module) -> None:
        warnings.warn(f"{module.__name__} moved to {' / '.join(MOVED[module.__name__])}; the old path stops working "
                      f"in pruner {REMOVAL}", DeprecationWarning, stacklevel=2)


def install() -> None:
    """Adds the finder to ``sys.meta_path`` once per process."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
