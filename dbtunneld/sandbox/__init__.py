"""The sandbox: a local stack of real servers (and named stand-ins) for demos and tests.

Not part of the product: only tests, benchmarks and ``dbtunneld sandbox`` import it.
Start here: ``from dbtunneld.sandbox import start_stack`` (see ``stack.py``).

Names are imported lazily, so the stand-in and relay subprocesses
(``python -m dbtunneld.sandbox.<module>``) do not pay for importing the whole stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClusterInfo": "stack", "Stack": "stack", "StackInfo": "stack", "StackOptions": "stack",
    "start_stack": "stack", "Service": "procs", "ServiceError": "procs", "StartError": "procs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
