"""gpukernels-common: backend choice, op registration, test and benchmark helpers.

Importing this package never imports triton.
"""

from .__about__ import __version__
from .backend import Backend, capturing, explain_backend, select_backend, tracing
from .device import has_cuda, triton_available
from .registry import RegisteredOp, inline_references, register_op
from .schedule import grouped_blocks

__all__ = [
    "__version__",
    "Backend",
    "explain_backend",
    "select_backend",
    "has_cuda",
    "triton_available",
    "RegisteredOp",
    "register_op",
    "inline_references",
    "tracing",
    "capturing",
    "grouped_blocks",
]
