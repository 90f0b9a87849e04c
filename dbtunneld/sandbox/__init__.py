"""The sandbox: a local stack of real servers (and named stand-ins) for demos and tests.

Not part of the product: only tests, benchmarks and ``dbtunneld sandbox`` import it.
Start here: ``from dbtunneld.sandbox import start_stack`` (see ``stack.py``).
"""

from .procs import Service, ServiceError, StartError
from .stack import ClusterInfo, Stack, StackInfo, StackOptions, start_stack

__all__ = ["ClusterInfo", "Service", "ServiceError", "Stack", "StackInfo", "StackOptions", "StartError",
           "start_stack"]
