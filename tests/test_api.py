"""The public API around the kernels: argument checks, backend choice, the nn.Module."""
import math

import pytest
import torch

import spem_kernels
from spem_kernels import SPEM, available_backends, spem, spem_reference


def args(shape=(2, 4, 3, 3)):
    C = shape[1]
    return [torch.randn(shape)] + [torch.randn(C) for _ in range(4)] + [torch.randn(2)]


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("mutate, error, words", [
    (lambda a: a.__setitem__(0, torch.randn(4, 3, 3)), ValueError, "x must be 4-D"),
    (lambda a: a.__setitem__(0, torch.ones(2, 4, 3, 3, dtype=torch.int64)), TypeError, "x must be"),
    (lambda a: a.__setitem__(0, torch.randn(2, 4, 0, 3)), ValueError, "non-empty planes"),
    (lambda a: a.__setitem__(1, torch.randn(5)), ValueError, "w1 must have 4 elements"),
    (lambda a: a.__setitem__(4, torch.randn(1, 3, 1, 1)), ValueError, "b2 must have 4 elements"),
    (lambda a: a.__setitem__(5, torch.randn(3)), ValueError, "p must have 2 elements"),
    (lambda a: a.__setitem__(2, torch.ones(4, dtype=torch.int32)), TypeError,
     "b1 must be a floating"),
    (lambda a: a.__setitem__(3, torch.randn(4, device="meta")), ValueError, "w2 is on meta"),
    (lambda a: a.__setitem__(0, [[1.0]]), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(backend, mutate, error, words):
    a = args()
    mutate(a)
    with pytest.raises(error, match=words):
        spem(*a, backend=backend)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_bad_residual(backend):
    a = args()
    with pytest.raises(ValueError, match="residual must have x's shape"):
        spem(*a, torch.randn(2, 4, 3, 4), backend=backend)
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        spem(*a, torch.randn(2, 4, 3, 3, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="residual is on meta"):
        spem(*a, torch.randn(2, 4, 3, 3, device="meta"), backend=backend)
    with pytest.raises(TypeError, match="relu must be a bool"):
        spem(*a, relu=1, backend=backend)


def test_backend_choice_errors_say_why():
    with pytest.raises(ValueError, match="backend must be one of"):
        spem(*args(), backend="cudnn")
    a = [t.to("meta") for t in args()]
    with pytest.raises(RuntimeError, match="cannot run on meta.*Triton does not run on meta"):
        spem(*a, backend="triton")


def test_available_backends_lists_what_runs():
    names = available_backends("cpu")
    assert "eager" in names
    assert set(names) <= {"triton", "native", "eager"}
    assert spem_kernels.backends.resolve("auto", torch.device("cpu")).NAME in names


def test_eager_backend_is_the_reference():
    a = args()
    assert torch.equal(spem(*a, backend="eager"), spem_reference(*a))


def test_module_initialisation_and_penalty():
    layer = SPEM(6)
    shapes = {name: tuple(t.shape) for name, t in layer.named_parameters()}
    assert shapes == {"w1": (1, 6, 1, 1), "b1": (1, 6, 1, 1), "w2": (1, 6, 1, 1),
                      "b2": (1, 6, 1, 1), "p": (2,)}
    assert torch.all(layer.w1 == 0) and torch.all(layer.w2 == 0)
    assert torch.all(layer.b1 == -1) and torch.all(layer.b2 == -1)
    assert torch.all(layer.p == 0.5)
    assert layer.penalty().item() == pytest.approx(0.5)
    x = torch.randn(3, 6, 4, 4)
    gate = 1 / (1 + math.exp(2)) / (1 + math.exp(1))  # sigmoid(-2) * sigmoid(-1)
    torch.testing.assert_close(layer(x), x * gate)


def test_module_forward_uses_the_op():
    layer = SPEM(4, backend="eager")
    with torch.no_grad():
        for t in layer.parameters():
            t.normal_()
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    expected = spem_reference(x, layer.w1, layer.b1, layer.w2, layer.b2, layer.p, r, relu=True)
    torch.testing.assert_close(layer(x, r, relu=True), expected)
    layer(x, r, relu=True).sum().backward()
    assert all(t.grad is not None for t in layer.parameters())
