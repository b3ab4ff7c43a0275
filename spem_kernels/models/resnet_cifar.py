"""CIFAR ResNets with SPEM after the last BatchNorm of every block (SPEM.md).

The layout, names and initialisation are those of the original ResNet-164 code, so a user's
existing checkpoints load with strict=True. The SPEM parameters sit on the block itself
(`layer1.0.w1`, not `layer1.0.spem.w1`), which is why the blocks call the functional ops.
A block's tail, relu(spem(bn(y)) + residual), is one op: spem_bn, with the last BatchNorm
module's own parameters and buffers (fuse_bn, the default), or that BatchNorm and then spem.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import NAMES as BACKENDS
from ..layer import SPEM, batch_norm_arguments
from ..ops import spem, spem_bn

# depth = step * n + 2: each of the 3 stages has n blocks of 3 (bottleneck) or 2 layers
DEPTH_STEP = {"bottleneck": 9, "basicblock": 6}
BLOCKS = tuple(DEPTH_STEP)
ATTENTIONS = ("spem", "none")


class _Block(nn.Module):
    """What both blocks share: the SPEM parameters and the tail relu(spem(bn(y)) + residual)."""

    def _init_attention(self, channels, attention, backend, fuse_bn):
        self.attention, self.backend, self.fuse_bn = attention, backend, fuse_bn
        if attention == "spem":
            # Borrow a SPEM layer's parameters, initialisation included, as the block's own.
            for name, param in SPEM(channels).named_parameters():
                self.register_parameter(name, param)

    def _tail(self, y, bn, residual):
        """relu(spem(bn(y)) + residual) (without attention relu(bn(y) + residual)). With
        fuse_bn, spem_bn does it all with bn's parameters and buffers, as bn would; a
        SyncBatchNorm (statistics across processes) is called as it is, then spem."""
        if self.attention == "none":
            return F.relu(bn(y) + residual)
        params = (self.w1, self.b1, self.w2, self.b2, self.p)
        if self.fuse_bn and not isinstance(bn, nn.SyncBatchNorm):
            tensors, options = batch_norm_arguments(bn)
            return spem_bn(y, *tensors, *params, residual, relu=True, backend=self.backend,
                           **options)
        return spem(bn(y), *params, residual, relu=True, backend=self.backend)

class BasicBlock(_Block):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, *, attention, backend,
                 fuse_bn):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self._init_attention(planes, attention, backend, fuse_bn)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        residual = x if self.downsample is None else self.downsample(x)
        return self._tail(self.conv2(out), self.bn2, residual)


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, *, attention, backend,
                 fuse_bn):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self._init_attention(planes * 4, attention, backend, fuse_bn)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return self._tail(self.conv3(out), self.bn3, residual)


class CifarResNet(nn.Module):
    """conv-bn-relu stem, three stages of `blocks` blocks (16, 32, 64 planes), avg pool 8, fc."""

    def __init__(self, block, blocks, num_classes, attention, backend, fuse_bn):
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        kw = dict(attention=attention, backend=backend, fuse_bn=fuse_bn)
        self.layer1 = self._make_layer(block, 16, blocks, 1, kw)
        self.layer2 = self._make_layer(block, 32, blocks, 2, kw)
        self.layer3 = self._make_layer(block, 64, blocks, 2, kw)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride, kw):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        # flatten, not view: the pooled tensor of a channels_last input is not contiguous.
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def spem_penalty(self):
        """Sum over SPEM layers of p0^2 + p1^2 (a zero tensor for the plain network).

        One stack and one reduction rather than a few ops per layer: this runs every
        training step, and 54 layers' worth of tiny launches would show on a GPU."""
        ps = [b.p for b in self.modules() if isinstance(b, _Block) and b.attention == "spem"]
        if not ps:
            return self.fc.weight.new_zeros(())
        return torch.stack(ps).square().sum()


def cifar_resnet(depth=164, num_classes=10, block_name="bottleneck", attention="spem",
                 backend="auto", fuse_bn=True):
    """A CIFAR ResNet: bottleneck blocks for depth 9n + 2 (164 -> 18 blocks per stage) or
    basic blocks (``block_name="basicblock"``) for depth 6n + 2; ``attention="none"`` gives
    the plain network. ``backend`` goes to every SPEM layer. ``fuse_bn``: each block's last
    BatchNorm runs inside its SPEM op (spem_bn: the same values and state_dict, less memory
    kept for the backward); False calls the BatchNorm module, then spem."""
    name = block_name.lower() if isinstance(block_name, str) else block_name
    if name not in BLOCKS:
        raise ValueError(f"block_name must be one of {BLOCKS}, got {block_name!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    blocks = blocks_per_stage(depth, name)
    if not isinstance(fuse_bn, bool):
        raise TypeError(f"fuse_bn must be a bool, got {type(fuse_bn).__name__}")
    block = Bottleneck if name == "bottleneck" else BasicBlock
    return CifarResNet(block, blocks, num_classes, attention, backend, fuse_bn)


def blocks_per_stage(depth, block_name):
    """n, the blocks per stage of a CIFAR ResNet of this depth: depth = 9n + 2 for bottleneck
    blocks (3 layers each), 6n + 2 for basic blocks (2 layers each). A ValueError says what
    fits where the depth does not (the trainer's --depth check is this one)."""
    step = DEPTH_STEP[block_name]
    if not isinstance(depth, int) or depth < step + 2 or (depth - 2) % step:
        raise ValueError(f"depth of a {block_name} ResNet must be {step}n + 2 with n >= 1 "
                         f"(e.g. {step + 2}, {2 * step + 2}, ...), got {depth!r}")
    return (depth - 2) // step
