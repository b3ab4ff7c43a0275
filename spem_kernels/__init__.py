"""spem_kernels: fused SPEM channel attention for PyTorch (see README.md)."""
from .backends import available_backends
from .layer import SPEM
from .ops import spem
from .reference import spem_reference

__all__ = ["SPEM", "available_backends", "spem", "spem_reference"]
__version__ = "0.1.0"
