"""Networks built on the SPEM layer."""
from .resnet_cifar import cifar_resnet

__all__ = ["cifar_resnet"]
