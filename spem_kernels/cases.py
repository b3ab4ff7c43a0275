"""The cases the demo, the benchmarks and the tests run: ResNet-164's stage shapes and the
inputs of the block tail that ends each of its blocks, in its two forms: relu(g * x +
residual) (spem, after the block's last BatchNorm) and relu(g * bn(y) + residual) (spem_bn,
that BatchNorm included), with the plain network's relu(bn(y) + residual) to compare with.

Anyone may import this module (spem_kernels.demo, benchmarks/, tests/); it needs nothing
beyond the package itself. Inputs are built the way a block's tail sees them: x and
residual of one dtype and memory format, parameters in float32 (what autocast leaves them
as) with a SPEM layer's shapes.
"""
import functools
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from .ops import spem, spem_bn
from .reference import spem_bn_reference, spem_reference

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
    # Tensors of x's size one call must move at the least, per direction (bytes_moved): fwd
    # reads x, residual and writes out; the backward adds reading grad_out, x, out and
    # writing dx, dresidual. Each input read once, each output written once.
    ACTIVATION_TRAFFIC: ClassVar[dict] = {"fwd": 3, "fwd+bwd": 8}

    def args(self):
        """spem's positional arguments: x, w1, b1, w2, b2, p, residual."""
        return (self.x, *self.params, self.residual)

    def leaves(self):
        """The inputs that get a gradient: x, w1, b1, w2, b2, p and the residual if any."""
        return tuple(t for t in (self.x, *self.params, self.residual) if t is not None)

    def per_channel(self):
        """The small tensors (C or 2 elements) a call reads: the SPEM parameters."""
        return self.params

    def bytes_moved(self, direction):
        """Bytes one call of the block tail with its residual must move at the least:
        ACTIVATION_TRAFFIC tensors of x's size, and the per-channel tensors read by fwd,
        read again and written (gradients, or an update) by the backward."""
        if self.residual is None:
            raise ValueError("bytes_moved counts the block tail, which has a residual")
        act = self.x.numel() * self.x.element_size()
        par = sum(t.numel() * t.element_size() for t in self.per_channel())
        return (self.ACTIVATION_TRAFFIC[direction] * act
                + (par if direction == "fwd" else 3 * par))


@dataclass
class BnTailInputs(BlockTailInputs):
    """spem_bn's inputs (training, as a network's training step calls it): x is y, the
    input of the block's last BatchNorm; bn: its running_mean, running_var, weight, bias
    (C elements each, in the parameters' dtype).

    Its least traffic (ACTIVATION_TRAFFIC) is that of a two-pass op each way, since
    BatchNorm's per-channel sums span every sample's plane, more than a cache holds at
    the stage shapes, before any element of the output can be written (a plane itself
    fits, so its max and min come with the pass that writes). fwd: one pass reads y for
    the batch statistics, the next reads y and residual and writes out (4). Backward:
    a pass reads grad_out, out (ReLU's mask) and y for the plane and channel sums and
    writes dresidual (the masked gradient); the next reads that and y and writes dy (7).
    The running statistics' in-place update counts as their gradients' write."""
    bn: tuple
    ACTIVATION_TRAFFIC: ClassVar[dict] = {"fwd": 4, "fwd+bwd": 4 + 7}

    def args(self):
        """spem_bn's positional arguments: y, running_mean, running_var, weight, bias, w1,
        b1, w2, b2, p, residual."""
        return (self.x, *self.bn, *self.params, self.residual)

    def leaves(self):
        """The inputs that get a gradient: y, weight, bias, w1, b1, w2, b2, p, residual."""
        return (self.x, *self.bn[2:], *self.params, self.residual)

    def per_channel(self):
        return (*self.bn, *self.params)


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
    return _requiring_grad(inputs, requires_grad)


def bn_tail_inputs(shape, dtype=torch.float32, memory_format=torch.contiguous_format,
                   device="cpu", *, requires_grad=False):
    """Fresh random inputs of spem_bn for `shape`: as block_tail_inputs', its x (here y)
    off-centre and scaled, so that BatchNorm has work to do, and BatchNorm's tensors with
    values like a trained network's (trained_batch_norm). With requires_grad, y, weight,
    bias, the SPEM parameters and the residual are leaves that require grad."""
    tail = block_tail_inputs(shape, dtype, memory_format, device)
    weight, bias, mean, var = trained_batch_norm(shape[1], device=device,
                                                 dtype=tail.params[0].dtype)
    inputs = BnTailInputs(tail.x.mul_(1.5).add_(0.25), tail.residual, tail.params,
                          tail.grad_out, (mean, var, weight, bias))
    return _requiring_grad(inputs, requires_grad)


def _requiring_grad(inputs, requires_grad):
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


def plain_bn_tail(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                  residual=None, *, training=True, momentum=0.1, eps=1e-5, relu=False):
    """The plain network's block tail relu(bn(y) + residual) (spem_kernels.models: a block
    without attention), with spem_bn's signature: the SPEM parameters are not used."""
    out = F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def bn_tail_op(impl):
    """The callable with spem_bn's signature that `impl` names: "eager" is the composition
    BatchNorm, then spem_reference, op by op (spem_bn_reference, the eager backend's);
    "plain" the plain network's tail (plain_bn_tail); a backend name is spem_bn with it."""
    if impl == "eager":
        return spem_bn_reference
    if impl == "plain":
        return plain_bn_tail
    return functools.partial(spem_bn, backend=impl)


# The block tail's two forms (BatchNorm before it, or in it): each one's inputs builder and
# the callable an implementation name stands for.
OPS = {"spem": (block_tail_inputs, block_tail_op), "spem_bn": (bn_tail_inputs, bn_tail_op)}


def block_tail_call(op, inputs, direction):
    """A function that makes one call of the block tail (residual, relu=True; spem_bn's
    defaults: training) with `op`: for "fwd", the forward under no_grad (inference: no
    autograd graph is recorded), returning the output; for "fwd+bwd", the forward and
    torch.autograd.grad of every leaf, returning the gradients (autograd.grad rather than
    .backward(): nothing accumulates into .grad between calls; None for a leaf `op` does
    not use, as the plain tail does not the SPEM parameters). fwd+bwd needs inputs made
    with requires_grad=True."""
    def forward():
        return op(*inputs.args(), relu=True)

    if direction == "fwd":
        return torch.no_grad()(forward)
    if direction != "fwd+bwd":
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return lambda: torch.autograd.grad(forward(), inputs.leaves(), inputs.grad_out,
                                       allow_unused=True)


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
                for t, value in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var),
                                    trained_batch_norm(bn.num_features, g)):
                    t.copy_(value)
    return model


def trained_batch_norm(C, generator=None, device="cpu", dtype=torch.float32):
    """weight, bias, running_mean, running_var (C each) of a BatchNorm with values like a
    trained network's: weight in [0.5, 1.5), bias and running mean ~ N(0, 0.2^2), running
    variance in [0.5, 2). Drawn on the CPU from `generator` (reproducible), then moved."""
    values = (torch.rand(C, generator=generator) + 0.5,
              0.2 * torch.randn(C, generator=generator),
              0.2 * torch.randn(C, generator=generator),
              torch.rand(C, generator=generator) * 1.5 + 0.5)
    return tuple(v.to(device, dtype) for v in values)
