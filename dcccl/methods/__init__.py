"""The methods ``dcccl compare`` runs, one file each, all behind :class:`dcccl.methods.base.Method`.

Every module of this package is imported here and every :class:`Method` subclass it defines is registered under
its ``name``: a new baseline is one new file.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Sequence
from typing import Optional

from dcccl.errors import ConfigError
from dcccl.methods.base import CostContext, Method
from dcccl.pipeline.stages import STAGES

METHODS: dict[str, Method] = {}


def _discover() -> None:
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Method) and not inspect.isabstract(cls) and cls.__module__ == module.__name__:
                if cls.name in METHODS:
                    raise ValueError(f"two methods are named {cls.name!r}: {cls.__module__} and "
                                     f"{type(METHODS[cls.name]).__module__}")
                METHODS[cls.name] = cls()


def registered() -> list[Method]:
    """Every registered method, in table order."""
    return sorted(METHODS.values(), key=lambda method: method.position)


def select(names: Optional[Sequence[str]]) -> list[Method]:
    """The methods called ``names`` (every registered one for ``None``), in table order.

    Raises:
        ConfigError: A name that no method has.
    """
    unknown = sorted(set(names or []) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown methods {unknown}: choose among {sorted(METHODS)}")
    return [method for method in registered() if names is None or method.name in names]


def stage_names() -> set[str]:
    """Every stage a pipeline config may name: the pipeline's own and those the registered methods need."""
    return {*STAGES, *(name for method in METHODS.values() for name in method.needs_stages)}


_discover()

__all__ = ["METHODS", "CostContext", "Method", "registered", "select", "stage_names"]
