"""Data sets kept whole on the training device."""
from .cifar import CifarLoader, load_cifar

__all__ = ["CifarLoader", "load_cifar"]
