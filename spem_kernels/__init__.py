"""spem_kernels: fused SPEM channel attention for PyTorch (README.md; the math: SPEM.md).

The public API is what this module exports. Inside, each layer imports only the ones below
it (data flows down in the forward pass, back up in the backward):

    reproduce.py, curves.py, paper.py        the paper's table in one resumable command,
                                             curves of runs, the paper's figures
    train.py, training.py, cuda_graphs.py    the CIFAR trainer and its command line
    provenance.py                            device, versions, commit (checkpoints, report)
    demo.py, cases.py, timing.py             the demo; cases and timer (also for benchmarks/)
    models/, data/                           CIFAR ResNets; CIFAR on the device
    layer.py                                 the SPEM nn.Module
    ops.py                                   the ops (spem, spem_bn): checks, backend
                                             choice, autograd
    backends/, reference.py, export.py       the kernels (csrc/ through native), the reference,
                                             the ops in standard ops (ONNX export)

Nothing below the trainer imports it; benchmarks/ and tests/ use this package's API.
"""
from .backends import available_backends
from .layer import SPEM
from .ops import spem, spem_bn
from .reference import spem_bn_reference, spem_reference

__all__ = ["SPEM", "available_backends", "spem", "spem_bn", "spem_bn_reference",
           "spem_reference"]
__version__ = "0.1.0"
