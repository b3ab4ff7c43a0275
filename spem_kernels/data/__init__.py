"""Data sets kept whole on the training device: CIFAR-10/100 read from the official files
(downloaded and extracted safely if need be), batched and augmented on the device (cifar.py).

Imports nothing of spem_kernels, only torch and numpy. The trainer (training.py) imports it;
nothing below the trainer (models/, layer.py, ops.py, backends/) does.
"""
from .cifar import CifarLoader, load_cifar

__all__ = ["CifarLoader", "load_cifar"]
