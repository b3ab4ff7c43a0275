"""The cases the demo, the benchmarks and the tests run: ResNet-164's stage shapes and the
inputs of the block tail relu(g * x + residual) that ends each of its blocks.

Anyone may import this module (spem_kernels.demo, benchmarks/, tests/); it needs nothing
beyond the package itself. Inputs are built the way a block's tail sees them: x and
residual of one dtype and memory format, parameters in float32 (what autocast leaves them
as) with a SPEM layer's shapes.
"""
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .ops import spem
from .reference import spem_reference

# (C, H, W) of each stage's block output in a CIFAR ResNet-164 (bottleneck width 4 * planes).
STAGES = {"stage1": (64, 32, 32), "stage2": (128, 16, 16), "stage3": (256, 8, 8)}
FULL_BATCH = 128  # the training batch of the paper's CIFAR runs
# (C, H, W) of the planes a drop-in layer meets in an ImageNet ResNet-50-like network: the
# stem's output and each stage's block output, larger planes than CIFAR's.
IMAGENET_STAGES = {"in112": (64, 112, 112), "in56": (256, 56, 56), "in28": (512, 28, 28),
                   "in14": (1024, 14, 14), "in7": (2048, 7, 7)}
IMAGENET_BATCH = 64
# Named sets of stages, with the batch each is measured at by default.
SHAPE_SETS = {"cifar": (STAGES, FULL_BATCH), "imagenet": (IMAGENET_STAGES, IMAGENET_BATCH)}
ALL_STAGES = {**STAGES, **IMAGENET_STAGES}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DIRECTIONS = ("fwd", "fwd+bwd")


def stage_shape(stage, batch=None):
    """(N, C, H, W) of `stage`'s block output (a CIFAR or an ImageNet stage) at `batch`
    (default: its set's batch)."""
    if batch is None:
        batch = FULL_BATCH if stage in STAGES else IMAGENET_BATCH
    return (batch, *ALL_STAGES[stage])


@dataclass
class BlockTailInputs:
    """One call's inputs and the output gradient its backward gets.

    params: w1, b1, w2, b2 of shape (1, C, 1, 1), as a SPEM layer holds them, and p (2,)."""
    x: torch.Tensor
    residual: Optional[torch.Tensor]
    params: tuple
    grad_out: torch.Tensor

    def args(self):
        """spem's positional arguments: x, w1, b1, w2, b2, p, residual."""
        return (self.x, *self.params, self.residual)

    def leaves(self):
        """The inputs that get a gradient: x, w1, b1, w2, b2, p and the residual if any."""
        return tuple(t for t in (self.x, *self.params, self.residual) if t is not None)

    def bytes_moved(self, direction):
        """Bytes one call of the block tail with its residual must move: each input read
        once, each output written once.

        fwd reads x, residual and writes out; the backward adds reading grad_out, x, out
        and writing dx, dresidual. Parameters: read by fwd; read again, and their gradients
        written, by the backward."""
        if self.residual is None:
            raise ValueError("bytes_moved counts the block tail, which has a residual")
        act = self.x.numel() * self.x.element_size()
        par = sum(t.numel() * t.element_size() for t in self.params)
        return 3 * act + par if direction == "fwd" else 8 * act + 3 * par


def block_tail_inputs(shape, dtype=torch.float32, memory_format=torch.contiguous_format,
                      device="cpu", *, residual=True, requires_grad=False):
    """Fresh random inputs for `shape` (N, C, H, W): x, residual and grad_out in `dtype` and
    `memory_format`; parameters in float32 (float64 when dtype is float64). With
    requires_grad, x, the parameters and the residual are leaves that require grad."""
    C = shape[1]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32

    def activation():
        t = torch.randn(shape, device=device, dtype=dtype)
        return t.contiguous(memory_format=memory_format)

    params = tuple(0.5 * torch.randn(1, C, 1, 1, device=device, dtype=pdtype) for _ in range(4))
    params += (torch.randn(2, device=device, dtype=pdtype),)
    inputs = BlockTailInputs(activation(), activation() if residual else None, params,
                             activation())
    if requires_grad:
        for t in inputs.leaves():
            t.requires_grad_()
    return inputs


def block_tail_op(impl):
    """The callable with spem's signature that `impl` names: "eager" is the reference, op by
    op; a backend name ("native", "triton") is spem with that backend."""
    if impl == "eager":
        return spem_reference
    return functools.partial(spem, backend=impl)


def block_tail_call(op, inputs, direction):
    """A function that makes one call of the block tail (residual, relu=True) with `op`:
    for "fwd", the forward under no_grad (inference: no autograd graph is recorded),
    returning the output; for "fwd+bwd", the forward and torch.autograd.grad of every leaf,
    returning the gradients (autograd.grad rather than .backward(): nothing accumulates
    into .grad between calls). fwd+bwd needs inputs made with requires_grad=True."""
    def forward():
        return op(*inputs.args(), relu=True)

    if direction == "fwd":
        return torch.no_grad()(forward)
    if direction != "fwd+bwd":
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return lambda: torch.autograd.grad(forward(), inputs.leaves(), inputs.grad_out)


def trained_like(model, seed=0):
    """`model`, in place, with values like a trained network's rather than its initial ones:
    SPEM parameters (w1, b1, w2, b2 ~ N(0, 0.5^2), p ~ N(0, 1)) and BatchNorm weights, biases
    and running statistics drawn from a generator seeded with `seed`. Checks of a whole
    model run on it: at initialisation every SPEM gate is one constant and BatchNorm in eval
    mode the identity, which would hide a wrong export."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("w1", "b1", "w2", "b2"):
                param.copy_(0.5 * torch.randn(param.shape, generator=g))
            elif leaf == "p":
                param.copy_(torch.randn(param.shape, generator=g))
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                C = bn.num_features
                bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
                bn.bias.copy_(0.2 * torch.randn(C, generator=g))
                bn.running_mean.copy_(0.2 * torch.randn(C, generator=g))
                bn.running_var.copy_(torch.rand(C, generator=g) * 1.5 + 0.5)
    return model
