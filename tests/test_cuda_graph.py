"""CUDA graphs: the op, a whole ResNet-164 training step, and torch.compile's
"reduce-overhead" mode capture and replay with the fused layers (GPU only).

A graph replays the kernels it recorded on the memory it recorded: these tests check that
replays give what uncaptured calls give, which fails if a call hides host work (a tensor made
on the host, a sync) or a launch on another stream.
"""
import copy

import pytest
import torch

from spem_kernels import spem, spem_bn, train
from spem_kernels.backends import compiled_backends
from spem_kernels.cuda_graphs import CapturedStep
from spem_kernels.models import cifar_resnet
from spem_kernels.timing import capture
from spem_kernels.training import make_optimizer, make_train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
BACKENDS = compiled_backends("cuda") if torch.cuda.is_available() else []
ALPHA = 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,memory_format", [
    (torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)],
    ids=["fp32-nchw", "bf16-channels_last"])
def test_op_forward_backward_replays_like_eager(backend, dtype, memory_format):
    shape = (32, 128, 16, 16)

    def activation():
        return torch.randn(shape, device="cuda", dtype=dtype).contiguous(
            memory_format=memory_format)

    x, residual = activation().requires_grad_(), activation().requires_grad_()
    params = [(0.5 * torch.randn(1, 128, 1, 1, device="cuda")).requires_grad_()
              for _ in range(4)] + [torch.randn(2, device="cuda").requires_grad_()]
    grad_out = activation()
    leaves = [x, *params, residual]

    def step():
        out = spem(x, *params, residual, relu=True, backend=backend)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    captured = capture(step)
    for _ in range(2):  # new values in the recorded buffers, then a replay
        with torch.no_grad():
            for t in (x, residual, grad_out):
                t.copy_(activation())
            for t in params:
                t.copy_(torch.randn_like(t))
        captured.replay()
        expected = step()
        for name, got, want in zip(["out", "x", "w1", "b1", "w2", "b2", "p", "residual"],
                                   captured.outputs, expected):
            assert torch.equal(got, want), name  # the same kernels on the same values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,memory_format", [
    (torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)],
    ids=["fp32-nchw", "bf16-channels_last"])
def test_spem_bn_forward_backward_replays_like_eager(backend, dtype, memory_format):
    """spem_bn in training (statistics, finalisation, the running statistics' update in
    place, the three backward launches) replays from a graph as eager calls run."""
    from op_inputs import make_bn_inputs

    kind = "channels_last" if memory_format == torch.channels_last else "contiguous"
    y, rm, rv, weight, bias, *params, residual = make_bn_inputs((32, 128, 16, 16), dtype, "cuda",
                                                                kind)
    grad_out = torch.randn_like(y)
    leaves = [t.requires_grad_() for t in (y, weight, bias, *params, residual)]
    stats = [rm.clone(), rv.clone()]

    def step():
        out = spem_bn(y, *stats, weight, bias, *params, residual, relu=True, backend=backend)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    captured = capture(step)  # its warm-up steps update the running statistics too
    for _ in range(2):
        with torch.no_grad():
            for t in (y, residual, grad_out):
                t.copy_(torch.randn_like(t))
        before = [s.clone() for s in stats]
        captured.replay()
        replayed = [s.clone() for s in stats]
        for s, b in zip(stats, before):
            s.copy_(b)
        expected = step()
        for name, got, want in zip(["out", "y", "weight", "bias", "w1", "b1", "w2", "b2", "p",
                                    "residual"], captured.outputs, expected):
            assert torch.equal(got, want), name
        for got, want in zip(replayed, stats):
            assert torch.equal(got, want)


def _trainer_step(model, net, autocast, lr=0.05, weight_decay=1e-4):
    """The trainer's own step (zero_grad, forward, loss, backward, SGD) for `model` (net, or a
    compiled form of it); the step returns (loss, cross-entropy, penalty, correct)."""
    optimizer = make_optimizer(net, lr, 0.9, weight_decay)
    no_scaler = torch.amp.GradScaler("cuda", enabled=False)
    return make_train_step(model, net, optimizer, no_scaler, autocast, ALPHA)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["fp32-nchw", "bf16-channels_last"])
def test_resnet164_training_step_captures_and_matches_uncaptured_steps(backend, precision):
    """Forward, backward and SGD step of ResNet-164 with fused SPEM layers, captured once and
    replayed, give the weights that the same steps give uncaptured."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(0)
    bf16 = precision.startswith("bf16")
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    # cache_enabled=False: autocast's cast cache must not outlive a capture
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
    eager = cifar_resnet(164, 10, "bottleneck", "spem", backend).cuda().to(memory_format=fmt)
    graphed = copy.deepcopy(eager)
    eager_step, graphed_step = (_trainer_step(m, m, autocast) for m in (eager, graphed))
    batches = [(torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=fmt),
                torch.randint(0, 10, (16,), device="cuda")) for _ in range(6)]

    eager_losses = [eager_step(images, labels)[0] for images, labels in batches]

    static_images, static_labels = (t.clone() for t in batches[0])
    warm = iter(batches[:3])

    def step():
        images, labels = next(warm, (None, None))
        if images is not None:  # the warm-up steps are real steps on the first batches
            static_images.copy_(images)
            static_labels.copy_(labels)
        return graphed_step(static_images, static_labels)[0]

    captured = capture(step, warmup=3)
    graphed_losses = []
    for images, labels in batches[3:]:
        static_images.copy_(images)
        static_labels.copy_(labels)
        captured.replay()
        graphed_losses.append(captured.outputs.clone())
    torch.testing.assert_close(torch.stack(graphed_losses), torch.stack(eager_losses[3:]),
                               rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_captured_step_recaptures_into_one_pool():
    """The trainer's CapturedStep, captured anew three times (as after each epoch's lr
    change), trains as uncaptured steps do (momentum made in the warm-up carries on through
    every graph) and records each graph into the memory of the one it replaces."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(0)
    eager = cifar_resnet(20, 10, "bottleneck", "spem", "auto").cuda()
    graphed = copy.deepcopy(eager)
    off = torch.autocast("cuda", enabled=False)
    eager_step = _trainer_step(eager, eager, off)
    captured = CapturedStep(_trainer_step(graphed, graphed, off), batch_size=16, warmup=2)
    batches = [(torch.randn(16, 3, 32, 32, device="cuda"),
                torch.randint(0, 10, (16,), device="cuda")) for _ in range(4)]
    reserved = []
    for _ in range(3):
        captured.reset()
        for images, labels in batches:
            got = captured(images, labels)[0].clone()
            torch.testing.assert_close(got, eager_step(images, labels)[0], rtol=1e-4, atol=1e-5)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[2] <= reserved[1], reserved
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_reduce_overhead_trains_like_eager(backend):
    """torch.compile(model, mode="reduce-overhead") (inductor + CUDA graphs) runs the op: a
    small ResNet with SPEM layers trains three steps as in eager mode."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = cifar_resnet(11, 10, "bottleneck", "spem", backend).cuda()
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, mode="reduce-overhead")
    off = torch.autocast("cuda", enabled=False)
    steps = [_trainer_step(eager, eager, off, weight_decay=0),
             _trainer_step(compiled, compiled_net, off, weight_decay=0)]
    for _ in range(3):
        images = torch.randn(16, 3, 32, 32, device="cuda")
        labels = torch.randint(0, 10, (16,), device="cuda")
        losses = [step(images, labels)[0].clone() for step in steps]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-4)
    # inductor skips CUDA graphs (and says why in this counter) for a graph it cannot capture
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_trainer_cuda_graph_trains_like_uncaptured(tmp_path):
    """train --cuda-graph: the same epochs as without it (captured anew each epoch, after an
    lr change too; the last, partial batch of each epoch uncaptured), the same files."""
    from tiny_cifar import write_cifar

    write_cifar(tmp_path / "data", train_sizes=(40, 40, 40, 40, 40), test_size=50, seed=1)
    torch.backends.cudnn.deterministic = True  # float32: runs differ by rounding alone
    runs = {}
    for name, extra in (("plain", []), ("graph", ["--cuda-graph"])):
        train.main(["--data-dir", str(tmp_path / "data"), "--checkpoint", str(tmp_path / name),
                    "--depth", "20", "--block-name", "bottleneck", "--epochs", "2",
                    "--schedule", "1", "--train-batch", "32", "--test-batch", "50",
                    "--manualSeed", "3", "--channels-last", *extra])
        runs[name] = torch.load(tmp_path / name / "checkpoint.pth.tar", weights_only=True)
    assert sorted(p.name for p in (tmp_path / "graph").iterdir()) == [
        "checkpoint.pth.tar", "log.png", "log.txt", "model_best.pth.tar"]
    for key, value in runs["plain"]["state_dict"].items():
        torch.testing.assert_close(runs["graph"]["state_dict"][key], value, rtol=1e-3,
                                   atol=1e-4, msg=key)
