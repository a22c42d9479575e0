"""The methods ``dcccl compare`` runs, one file each, all behind :class:`dcccl.methods.method.Method`.

Each method registers itself (``@register_method`` on its class); every module of this package is imported here, so
a new baseline is one new file.
"""

from __future__ import annotations

from dcccl.methods.method import METHODS, CostContext, Method, register_method, registered, select, stage_names
from dcccl.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["METHODS", "CostContext", "Method", "register_method", "registered", "select", "stage_names"]
