"""What the benchmarks measure, shared by the pytest-benchmark files and report.py.

The shapes are the three stages of a CIFAR ResNet-164 (bottleneck width 4 * planes);
inputs are built the way a block's tail sees them: x and residual of one dtype and
memory format, float32 parameters (what autocast leaves them as).
"""
from dataclasses import dataclass

import torch

from spem_kernels import spem, spem_reference

# (C, H, W) of the stage outputs at the full batch of 128.
STAGES = {"stage1": (64, 32, 32), "stage2": (128, 16, 16), "stage3": (256, 8, 8)}
FULL_BATCH = 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DIRECTIONS = ("fwd", "fwd+bwd")


@dataclass
class Inputs:
    x: torch.Tensor
    residual: torch.Tensor
    params: tuple  # w1, b1, w2, b2 (C,) and p (2,), float32
    grad_out: torch.Tensor

    def grad_targets(self):
        return (self.x, self.residual, *self.params)


def make_inputs(batch, stage, dtype, layout, device):
    """One input set; everything but grad_out requires grad (fwd runs under no_grad)."""
    C, H, W = STAGES[stage]
    fmt = LAYOUTS[layout]

    def act():
        t = torch.randn(batch, C, H, W, device=device, dtype=DTYPES[dtype])
        return t.contiguous(memory_format=fmt)

    params = tuple(torch.randn(C, device=device).mul_(0.5).requires_grad_() for _ in range(4))
    p = torch.tensor([0.5, 0.7], device=device, requires_grad=True)
    return Inputs(act().requires_grad_(), act().requires_grad_(), params + (p,), act())


def bytes_moved(inputs, direction):
    """Bytes the block tail must move: each input read once, each output written once.

    fwd reads x, residual and writes out; the backward adds reading grad_out, x, out and
    writing dx, dresidual. Parameters: read by fwd; read again, and their grads written, by bwd.
    """
    act = inputs.x.numel() * inputs.x.element_size()
    par = sum(t.numel() * t.element_size() for t in inputs.params)
    if direction == "fwd":
        return 3 * act + par
    return 8 * act + 3 * par


def op_for(impl):
    """The callable with spem's signature that `impl` names: "eager", or a fused backend."""
    if impl == "eager":
        return spem_reference
    return lambda *a, **k: spem(*a, backend=impl, **k)


def step_fn(op, inputs, direction):
    """One timed call of the block tail (residual + relu=True); fwd+bwd returns all grads.

    autograd.grad rather than .backward(): nothing accumulates into .grad between calls.
    """
    def fwd():
        return op(inputs.x, *inputs.params, inputs.residual, relu=True)

    if direction == "fwd":
        return torch.no_grad()(fwd)  # inference: no autograd graph is recorded

    def fwd_bwd():
        return torch.autograd.grad(fwd(), inputs.grad_targets(), inputs.grad_out)

    return fwd_bwd
