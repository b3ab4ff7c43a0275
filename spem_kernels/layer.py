"""SPEM as an nn.Module (the parameters, their initialisation, the regulariser), and what an
nn.BatchNorm2d module hands spem_bn."""
import torch
from torch import nn

from .ops import spem


class SPEM(nn.Module):
    """Self-adaptive Pooling Enhanced attention over `channels` channels (SPEM.md).

    Parameters have the original checkpoints' shapes: w1, b1, w2, b2 (1, C, 1, 1), p (2,).
    ``forward(x, residual=None, relu=False)`` returns relu?(g * x + residual).
    """

    def __init__(self, channels, *, backend="auto"):
        super().__init__()
        self.channels = channels
        self.backend = backend
        self.w1 = nn.Parameter(torch.empty(1, channels, 1, 1))
        self.b1 = nn.Parameter(torch.empty(1, channels, 1, 1))
        self.w2 = nn.Parameter(torch.empty(1, channels, 1, 1))
        self.b2 = nn.Parameter(torch.empty(1, channels, 1, 1))
        self.p = nn.Parameter(torch.empty(2))
        self.reset_parameters()

    def reset_parameters(self):
        """w1 = w2 = 0, b1 = b2 = -1, p = (0.5, 0.5): every gate starts at
        sigmoid(-2) sigmoid(-1)."""
        with torch.no_grad():
            self.w1.zero_()
            self.w2.zero_()
            self.b1.fill_(-1.0)
            self.b2.fill_(-1.0)
            self.p.fill_(0.5)

    def forward(self, x, residual=None, relu=False):
        return spem(x, self.w1, self.b1, self.w2, self.b2, self.p, residual, relu=relu,
                    backend=self.backend)

    def penalty(self):
        """p0^2 + p1^2, this layer's term of the regulariser."""
        return (self.p * self.p).sum()

    def extra_repr(self):
        return f"{self.channels}, backend={self.backend!r}"


def batch_norm_arguments(bn):
    """What `bn` (an nn.BatchNorm2d) would pass F.batch_norm in its forward, as spem_bn takes
    it: ((running_mean, running_var, weight, bias), {training, momentum, eps}). Like that
    forward it counts the batch in num_batches_tracked when training with running statistics,
    turns momentum=None into the cumulative factor 1 / num_batches_tracked, normalises with
    batch statistics in training (and in eval without running statistics), and updates the
    running statistics only when it tracks them."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    running = not bn.training or bn.track_running_stats
    return ((bn.running_mean if running else None, bn.running_var if running else None,
             bn.weight, bn.bias), dict(training=training, momentum=momentum, eps=bn.eps))
