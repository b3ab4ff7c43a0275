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
    with pytest.raises(TypeError, match="fuse_bn must be a bool"):
        cifar_resnet(fuse_bn="yes")


def _pair(depth, block_name, **kw):
    """The same random-weight network twice: its blocks' last BatchNorm inside spem_bn
    (fuse_bn) and apart (the module, then spem)."""
    torch.manual_seed(0)
    fused = cifar_resnet(depth, block_name=block_name, backend="native", **kw)
    with torch.no_grad():
        for name, t in fused.named_parameters():
            if name.rsplit(".", 1)[-1] in ("w1", "b1", "w2", "b2", "p", "weight", "bias"):
                t.add_(0.3 * torch.randn_like(t))
        for m in fused.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    unfused = cifar_resnet(depth, block_name=block_name, backend="native", fuse_bn=False, **kw)
    unfused.load_state_dict(fused.state_dict())
    return fused, unfused


@pytest.mark.parametrize("block_name, depth", [("bottleneck", 11), ("basicblock", 8)])
def test_fused_batch_norm_trains_and_evaluates_as_the_module(block_name, depth):
    """Three SGD steps in train mode, then eval: the fused blocks' logits, gradients, running
    statistics and num_batches_tracked are those of BatchNorm modules followed by spem."""
    fused, unfused = _pair(depth, block_name)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (fused, unfused)]
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        for model, opt in zip((fused, unfused), opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        torch.testing.assert_close(fused.layer1[0].w2.grad, unfused.layer1[0].w2.grad,
                                   rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(fused.state_dict().items(), unfused.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert fused.layer1[0].bn3.num_batches_tracked.item() == 3 if block_name == "bottleneck" \
        else fused.layer1[0].bn2.num_batches_tracked.item() == 3
    x = torch.randn(4, 3, 32, 32)
    fused.eval()
    unfused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), unfused(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", ["momentum=None", "track_running_stats=False",
                                    "affine=False"])
def test_fused_batch_norm_follows_the_module_options(option):
    """nn.BatchNorm2d's options on the fused BatchNorm: a cumulative average (momentum None),
    batch statistics only (no running statistics), no weight and bias."""
    fused, unfused = _pair(11, "bottleneck")
    for model in (fused, unfused):
        for block in (*model.layer1, *model.layer2, *model.layer3):
            if option == "momentum=None":
                block.bn3.momentum = None
            elif option == "track_running_stats=False":
                block.bn3.track_running_stats = False
                block.bn3.running_mean = block.bn3.running_var = None
            else:
                block.bn3.weight = block.bn3.bias = None
    for train in (True, True, False):
        fused.train(train)
        unfused.train(train)
        x = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(fused(x), unfused(x), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(fused.state_dict().items(), unfused.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_original_checkpoint_gives_the_same_logits_fused():
    """An original ResNet-164 checkpoint loads strictly into the fused network and gives the
    logits of the original eager code (BatchNorm modules, then the SPEM reference)."""
    g = torch.Generator().manual_seed(1)
    original = {}
    for k, s in original_resnet164_shapes().items():
        if k.endswith("num_batches_tracked"):
            original[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            original[k] = torch.rand(s, generator=g) + 0.5
        elif k.endswith(".weight") and len(s) == 4:  # convolutions: variance-preserving
            original[k] = torch.randn(s, generator=g) * math.sqrt(2.0 / (s[1] * s[2] * s[3]))
        else:
            original[k] = 0.3 * torch.randn(s, generator=g) + (1.0 if k.endswith("bn3.weight")
                                                               else 0.0)
    fused = cifar_resnet(164).eval()
    fused.load_state_dict(original)  # strict
    eager = cifar_resnet(164, backend="eager", fuse_bn=False).eval()
    eager.load_state_dict(original)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-4)


def test_sync_batch_norm_runs_apart():
    """A SyncBatchNorm (statistics across processes) is never fused: the block calls it, then
    spem, and gives the plain BatchNorm network's values."""
    fused, unfused = _pair(11, "bottleneck")
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fused).eval()
    assert isinstance(synced.layer1[0].bn3, torch.nn.SyncBatchNorm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(synced(x), unfused.eval()(x), rtol=1e-5, atol=1e-6)
