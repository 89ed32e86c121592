"""Training: ``train`` (a recipe -> a run folder), ``evaluate``, knowledge distillation
(``Distiller``) and structured block pruning (``BlockPruning``, ``shrink``).

    >>> from glt_keras.training import train, Distiller, BlockPruning, shrink  # doctest: +SKIP

The names load their module on first use, so ``import glt_keras`` and ``glt_keras.zoo``
never import the training code, and the submodules may import each other freely.
"""
from __future__ import annotations

import importlib

#: public name -> submodule that defines it
_EXPORTS = {
    "train": "run",
    "evaluate": "run",
    "Distiller": "distill",
    "BlockPruning": "pruning",
    "shrink": "pruning",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
