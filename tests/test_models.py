"""cifar_resnet: the original checkpoint layout, the fused SPEM tail, options and errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from spem_kernels import spem_reference
from spem_kernels.models import cifar_resnet
from spem_kernels.training import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def original_resnet164_shapes(num_classes=10):
    """Keys and shapes of the original ResNet-164 checkpoint, written out from SPEM.md's
    layout (not from the model code): stem, 3 stages x 18 bottlenecks, fc."""
    shapes = {}

    def conv(name, out, inp, k):
        shapes[f"{name}.weight"] = (out, inp, k, k)

    def bn(name, c):
        for buf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{buf}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    conv("conv1", 16, 3, 3)
    bn("bn1", 16)
    inplanes = 16
    for k, planes in enumerate((16, 32, 64), start=1):
        for i in range(18):
            block = f"layer{k}.{i}"
            conv(f"{block}.conv1", planes, inplanes, 1)
            bn(f"{block}.bn1", planes)
            conv(f"{block}.conv2", planes, planes, 3)
            bn(f"{block}.bn2", planes)
            conv(f"{block}.conv3", 4 * planes, planes, 1)
            bn(f"{block}.bn3", 4 * planes)
            if i == 0:
                conv(f"{block}.downsample.0", 4 * planes, inplanes, 1)
                bn(f"{block}.downsample.1", 4 * planes)
            for name in ("w1", "b1", "w2", "b2"):
                shapes[f"{block}.{name}"] = (1, 4 * planes, 1, 1)
            shapes[f"{block}.p"] = (2,)
            inplanes = 4 * planes
    shapes["fc.weight"] = (num_classes, 256)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def test_resnet164_has_exactly_the_original_keys_and_shapes():
    model = cifar_resnet(164, num_classes=100)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == original_resnet164_shapes(100)


def test_original_state_dict_loads_strictly_also_with_module_prefix(tmp_path):
    g = torch.Generator().manual_seed(0)
    original = {k: (torch.randint(0, 9, s, generator=g) if k.endswith("num_batches_tracked")
                    else torch.randn(s, generator=g))
                for k, s in original_resnet164_shapes().items()}
    model = cifar_resnet(164)
    model.load_state_dict(original)  # strict
    assert torch.equal(model.layer3[17].p, original["layer3.17.p"])
    # a DataParallel trainer's checkpoint: every key under "module."
    path = tmp_path / "dp.pth.tar"
    torch.save({"epoch": 3, "best_acc": 50.0,
                "state_dict": {f"module.{k}": v for k, v in original.items()}}, path)
    model = cifar_resnet(164)
    model.load_state_dict(load_checkpoint(str(path))["state_dict"])
    assert torch.equal(model.fc.weight, original["fc.weight"])


@pytest.mark.parametrize("depth, block_name, blocks", [(11, "bottleneck", 1), (20, "bottleneck", 2),
                                                       (8, "basicblock", 1), (14, "BasicBlock", 2)])
@pytest.mark.parametrize("attention", ["spem", "none"])
def test_forward_shapes_penalty_and_init(depth, block_name, blocks, attention):
    torch.manual_seed(0)
    model = cifar_resnet(depth, num_classes=7, block_name=block_name, attention=attention,
                         backend="eager")
    assert len(model.layer2) == blocks
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    penalty = model.spem_penalty()
    spem_keys = [k for k in model.state_dict() if k.endswith(".p")]
    if attention == "spem":
        assert len(spem_keys) == 3 * blocks
        assert penalty.item() == pytest.approx(0.5 * 3 * blocks)  # p = (0.5, 0.5) per layer
        penalty.backward()
        assert torch.equal(model.layer1[0].p.grad, torch.ones(2))
        block = model.layer1[0]
        assert torch.equal(block.w1, torch.zeros_like(block.w1))
        assert torch.equal(block.b2, torch.full_like(block.b2, -1.0))
    else:
        assert spem_keys == [] and penalty.item() == 0.0
    conv = model.layer2[0].conv1
    std = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
    assert conv.weight.std().item() == pytest.approx(std, rel=0.3)
    assert torch.equal(model.layer1[0].bn1.weight, torch.ones(16))
    assert torch.equal(model.bn1.bias, torch.zeros(16))


@pytest.mark.parametrize("block_name, depth", [("bottleneck", 11), ("basicblock", 8)])
def test_block_ends_in_the_fused_spem_tail(block_name, depth):
    torch.manual_seed(0)
    model = cifar_resnet(depth, block_name=block_name, backend="eager").eval()
    block = model.layer1[0]
    with torch.no_grad():
        block.w1.normal_()
        block.w2.normal_()
        block.p.copy_(torch.tensor([0.3, 1.2]))
        x = F.relu(torch.randn(2, 16, 32, 32))
        out = F.relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
        if block_name == "bottleneck":
            out = block.bn3(block.conv3(F.relu(out)))
        residual = x if block.downsample is None else block.downsample(x)
        expected = spem_reference(out, block.w1, block.b1, block.w2, block.b2, block.p, residual,
                                  relu=True)
        torch.testing.assert_close(block(x), expected)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = cifar_resnet(11, backend="auto")
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    expected.sum().backward()
    grad = model.layer2[0].w2.grad.clone()
    model.zero_grad()
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.layer2[0].w2.grad, grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=165), "9n \\+ 2"),
    (dict(depth=2), "9n \\+ 2"),
    (dict(depth=11, block_name="basicblock"), "6n \\+ 2"),
    (dict(depth="164"), "9n \\+ 2"),
    (dict(block_name="preact"), "block_name must be one of"),
    (dict(attention="se"), "attention must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cifar_resnet(**kwargs)
