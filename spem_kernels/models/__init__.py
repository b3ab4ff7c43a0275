"""Networks built on the SPEM layer: the paper's CIFAR ResNets, whose state_dict has the
original trainer's layout (resnet_cifar.py).

They import the layers below them (layer.py, ops.py, the backend names of backends/), never
data/ or the trainer. The trainer (training.py) and benchmarks/ import them.
"""
from .resnet_cifar import ATTENTIONS, BLOCKS, blocks_per_stage, cifar_resnet

__all__ = ["ATTENTIONS", "BLOCKS", "blocks_per_stage", "cifar_resnet"]
