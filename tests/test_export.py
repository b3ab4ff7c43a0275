"""Deployment of SPEM models: ONNX export run by ONNX Runtime, torch.export saved and loaded
in a fresh process, AOTInductor on CPU (docs/export.md).

Models run with trained-like values (spem_kernels.cases.trained_like): at initialisation
every gate is one constant and BatchNorm the identity, which would hide a wrong export.
ONNX graphs are exported once with a dynamic batch and run at several batch sizes. Errors
are max |got - expected| / max |expected|, in float64.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from spem_kernels import SPEM, spem_reference
from spem_kernels.backends import resolve, unavailable_reason
from spem_kernels.cases import trained_like
from spem_kernels.export import COMPOSITIONS, decompositions
from spem_kernels.models import cifar_resnet
from spem_kernels.ops import spem_bn_forward, spem_forward
from op_inputs import make_bn_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def require(module):
    """`module`, imported; where it is missing the test skips (a GPU image without the onnx
    extra), except in CI, which installs it (scripts/env.sh): there it fails."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed (pip install '.[onnx]')")


def max_rel_err(got, expected):
    got, expected = torch.as_tensor(got).double(), expected.double()
    # An all-zero expectation (ReLU at batch 1 can give one) compares absolutely: 0/0 is no pass.
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((got - expected).abs().max() / scale).item()


def onnx_session(model, args):
    """ONNX Runtime (CPU) session of `model` exported with torch.onnx.export(dynamo=True) and
    nothing else but a dynamic batch on every input tensor (args: tensors or lists of
    tensors), and the ONNX model."""
    ort = require("onnxruntime")
    require("onnxscript")
    batch = {0: torch.export.Dim("batch", min=1)}
    dynamic = tuple([batch] * len(a) if isinstance(a, list) else batch for a in args)
    program = torch.onnx.export(model, args, dynamo=True, verbose=False, dynamic_shapes=dynamic)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(program.model_proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, program.model_proto


def run_onnx(session, *args):
    """The session's outputs for args (tensors or lists of tensors, as exported)."""
    flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), flat)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def assert_standard_operators(model_proto):
    """Only operators of the standard ONNX domain, the plane's max and min among them."""
    ops = {(node.domain, node.op_type) for node in model_proto.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
    assert {"ReduceMax", "ReduceMin"} <= {op for _, op in ops}
    assert not model_proto.functions  # nothing left as a local function to inline


class BlockTail(nn.Module):
    """A SPEM layer's block tail relu(g * x + residual) as a module of (x, residual)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, residual):
        return self.layer(x, residual, relu=True)


class OddShapes(nn.Module):
    """The op alone at shapes that corner a kernel: 1x1 planes (max = min), odd planes,
    ties (integer-valued inputs, see `inputs`) and a constant plane; every tail. Its input
    is a list: each layer's x, then its residual where that layer has one."""
    SHAPES = [(3, 5, 1, 1), (2, 6, 7, 7), (2, 3, 13, 17), (2, 4, 6, 5)]
    TAILS = [(True, True), (True, False), (False, True), (False, False)]  # (residual, relu)

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(SPEM(shape[1]) for shape in self.SHAPES)

    def forward(self, inputs):
        return tuple(layer(x, r, relu) for layer, (x, r), (_, relu)
                     in zip(self.layers, self._per_layer(inputs), self.TAILS))

    def _per_layer(self, inputs):
        """[(x, residual or None)] per layer from the flat inputs."""
        inputs, pairs = list(inputs), []
        for residual, _ in self.TAILS:
            x = inputs.pop(0)
            pairs.append((x, inputs.pop(0) if residual else None))
        return pairs

    def inputs(self, batch, dtype):
        """Fresh inputs at `batch`; the last layer's x is integer-valued (many ties) with one
        constant plane."""
        args = []
        for shape, (residual, _) in zip(self.SHAPES, self.TAILS):
            shape = (batch, *shape[1:])
            args += [torch.randn(shape).to(dtype)] + ([torch.randn(shape).to(dtype)]
                                                      if residual else [])
        last = torch.randint(-2, 3, args[-1].shape).to(dtype)
        last[0, 1] = 0.7
        return args[:-1] + [last]

    def reference(self, inputs):
        """Each layer's output from the eager reference in float64."""
        outs = []
        for layer, (x, r), (_, relu) in zip(self.layers, self._per_layer(inputs), self.TAILS):
            params = [t.double() for t in (layer.w1, layer.b1, layer.w2, layer.b2, layer.p)]
            outs.append(spem_reference(x.double(), *params, None if r is None else r.double(),
                                       relu=relu))
        return outs


# 16-bit: out is computed in float32 and rounded once (half an ulp, 2**-11 relative), as the
# fused kernels do; float32 is as tight as the op's own tests.
OP_TOL = {torch.float32: 1e-6, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_onnx_op_alone_matches_reference(dtype):
    """The op at odd shapes and ties, exported once and run at two batch sizes: ONNX Runtime
    within rounding of the float64 reference and of the fused op."""
    model = trained_like(OddShapes(), seed=1).eval()
    session, proto = onnx_session(model, (model.inputs(2, dtype),))
    assert_standard_operators(proto)
    for batch in (1, 4):
        args = model.inputs(batch, dtype)
        got = run_onnx(session, args)
        with torch.no_grad():
            fused = model(args)
        for g, f, ref in zip(got, fused, model.reference(args)):
            assert g.dtype == dtype and g.shape == ref.shape
            assert max_rel_err(g, ref) <= OP_TOL[dtype]
            assert max_rel_err(g, f) <= 2 * OP_TOL[dtype]


def check_resnet_onnx(depth, block_name, batches, dtype=torch.float32):
    """A CIFAR ResNet with SPEM in every block, exported to ONNX once (batch 2); ONNX Runtime's
    logits against PyTorch's at each of `batches`. Returns the errors."""
    torch.manual_seed(0)
    model = trained_like(cifar_resnet(depth, block_name=block_name), seed=2).eval().to(dtype)
    session, proto = onnx_session(model, (torch.randn(2, 3, 32, 32, dtype=dtype),))
    assert_standard_operators(proto)
    errors = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32, dtype=dtype)
        (got,) = run_onnx(session, x)
        with torch.no_grad():
            expected = model(x)
        assert got.shape == expected.shape
        errors.append(max_rel_err(got, expected))
    return model, session, errors


def test_onnx_resnet20_float32():
    _, _, errors = check_resnet_onnx(20, "basicblock", (1, 3, 8))
    assert max(errors) <= 1e-4, errors


def test_onnx_resnet20_float16():
    """ONNX Runtime in float16 as close to the float64 model as PyTorch's float16 run is
    (both ~1e-3 after 20 layers of half-precision rounding)."""
    model, session, errors = check_resnet_onnx(20, "basicblock", (1, 5), torch.float16)
    assert max(errors) <= 5e-3, errors
    x = torch.randn(3, 3, 32, 32)
    (got,) = run_onnx(session, x.half())
    with torch.no_grad():
        exact = model.double()(x.double())
    assert max_rel_err(got, exact) <= 5e-3


def test_onnx_resnet164_float32():
    """ResNet-164 (54 bottlenecks): the slowest export here, about half a minute."""
    _, _, errors = check_resnet_onnx(164, "bottleneck", (1, 2, 5))
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("backend", ["auto", "native", "triton", "eager"])
def test_onnx_export_is_the_same_for_every_backend(backend):
    """ONNX export never resolves the backend (the Triton one on CPU included): every
    backend exports the same standard operators."""
    layer = trained_like(SPEM(4, backend=backend), seed=3).eval()
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    session, proto = onnx_session(BlockTail(layer).eval(), (x, r))
    assert_standard_operators(proto)
    (got,) = run_onnx(session, x, r)
    params = (layer.w1, layer.b1, layer.w2, layer.b2, layer.p)
    assert max_rel_err(got, spem_reference(x.double(), *[t.double() for t in params],
                                            r.double(), relu=True)) <= 1e-6


@pytest.mark.parametrize("shape", OddShapes.SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_composition_stands_in_for_the_op(case, shape, dtype):
    """The composition (what ONNX export records, and what decompositions() puts in place of
    the op) gives the fused op's outputs: out within rounding, stats and the first positions
    of ties exactly (integer-valued x: many ties)."""
    backend, device = case
    x = torch.randint(-2, 3, shape, device=device).to(dtype)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = [0.5 * torch.randn(shape[1], dtype=pdtype, device=device) for _ in range(4)]
    args = (x, *params, torch.randn(2, dtype=pdtype, device=device),
            torch.randn(shape, device=device).to(dtype), True, backend)
    out, stats, idx = COMPOSITIONS["spem_kernels::spem_forward"](*args)
    fused_out, fused_stats, fused_idx = spem_forward(*args)
    assert max_rel_err(out, fused_out) <= {torch.float16: 1e-3}.get(dtype, 1e-6)
    assert out.dtype == dtype and torch.equal(stats, fused_stats)
    assert torch.equal(idx, fused_idx)


def test_exported_program_decomposes_for_onnx():
    """A program exported with torch.export holds the fused op; run_decompositions with
    spem_kernels.export.decompositions() turns it into standard ops that export to ONNX."""
    require("onnxscript")
    ort = require("onnxruntime")
    layer = trained_like(SPEM(6), seed=4).eval()
    x, r = torch.randn(2, 6, 7, 7), torch.randn(2, 6, 7, 7)
    program = torch.export.export(BlockTail(layer).eval(), (x, r))
    targets = {str(n.target) for n in program.graph.nodes}
    assert "spem_kernels.spem_forward.default" in targets
    program = program.run_decompositions(decompositions())
    assert not any("spem" in str(n.target) for n in program.graph.nodes)
    proto = torch.onnx.export(program, dynamo=True, verbose=False).model_proto
    assert_standard_operators(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = run_onnx(session, x, r)
    with torch.no_grad():
        assert max_rel_err(got, layer(x, r, relu=True)) <= 1e-6


@pytest.mark.parametrize("backend", ["auto", "native", "triton", "eager"])
def test_torch_export_keeps_each_backend(backend):
    """torch.export records the fused op with the backend that ran (the reference's own
    operators for "eager"), and the program gives the eager call's output."""
    if backend != "auto" and unavailable_reason(backend, "cpu") is not None:
        pytest.skip(unavailable_reason(backend, "cpu"))
    name = resolve(backend, torch.device("cpu")).NAME
    layer = trained_like(SPEM(4, backend=backend), seed=6).eval()
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    program = torch.export.export(BlockTail(layer).eval(), (x, r))
    fused = [n.args[-1] for n in program.graph.nodes
             if n.target is torch.ops.spem_kernels.spem_forward.default]
    assert fused == ([] if name == "eager" else [name])
    with torch.no_grad():
        assert max_rel_err(program.module()(x, r), layer(x, r, relu=True)) <= 1e-6


LOAD_AND_RUN = """
import sys, torch
import spem_kernels  # registers spem_kernels::spem_bn_forward, which both files call
saved = torch.load(sys.argv[3])
program = torch.export.load(sys.argv[1])
assert "spem_kernels.spem_bn_forward.default" in {str(n.target) for n in program.graph.nodes}
package = torch._inductor.aoti_load_package(sys.argv[2])
for name, model in (("torch.export", program.module()), ("AOTInductor", package)):
    with torch.no_grad():
        got = model(saved["x"])
    err = ((got - saved["logits"]).abs().max() / saved["logits"].abs().max()).item()
    assert err <= 1e-6, (name, err)
print("ok")
"""


def test_torch_export_and_aotinductor_load_in_a_fresh_process(tmp_path):
    """Export (dynamic batch), torch.export.save and aoti_compile_and_package here; in a new
    process that imports spem_kernels, both run at another batch size and give this
    process's logits. The program keeps the fused op, which the AOTInductor package calls."""
    torch.manual_seed(0)
    model = trained_like(cifar_resnet(8, block_name="basicblock"), seed=5).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "model.pt2")
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "model_aoti.pt2"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x)}, tmp_path / "io.pt")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD_AND_RUN), str(tmp_path / "model.pt2"),
         package, str(tmp_path / "io.pt")],
        capture_output=True, text=True, timeout=600, env=dict(os.environ), cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_bn_composition_stands_in_for_the_op(case, dtype, training):
    """spem_bn's composition gives spem_bn_forward's outputs: out, the normalised values'
    stats and first positions, mean, invstd and the updated running statistics."""
    backend, device = case
    inputs = make_bn_inputs((3, 5, 4, 6), dtype, device)
    args = (*inputs, training, 0.1, 1e-5, True, backend)
    got = COMPOSITIONS["spem_kernels::spem_bn_forward"](*args)
    fused = spem_bn_forward(*args)
    tol = {torch.float16: 1e-3, torch.float64: 1e-12}.get(dtype, 1e-5)
    for name, a, b in zip(["out", "stats", "idx", "mean", "invstd", "running_mean",
                           "running_var"], got, fused):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "idx":
            assert torch.equal(a, b), name
        elif a.numel():
            assert max_rel_err(a, b) <= tol, name
