"""The fuzz tests' cases (test_fuzz.py): hypothesis strategies that draw small recipes, and
the tensors each recipe builds, always the same ones.

A case is a frozen dataclass of plain values (shape, dtype names, value recipes with a seed,
special values at drawn positions, layouts, options), so its repr, which hypothesis prints
for a failing example, pastes back as `@example(...)` or into `case.tensors()` and rebuilds
the very tensors that failed. Shrinking works on the recipe: fewer specials, smaller shapes,
plainer layouts and values.

What is drawn (issue 22): shapes N, C, H, W from 1 (planes that are and are not multiples of
the kernels' 16 lanes, C past one group of 16 channels); layouts: NCHW, channels_last and
views passed as they are (a slice of a larger buffer that holds NaN around the view, two
permutations of a dense buffer, and expansions with stride 0); float32, float64, float16,
bfloat16; values: continuous at several scales, small integers (ties within and across
lanes), all-equal planes, an offset with a spread that only 16 bits round to ties, tiny
(subnormal) and large magnitudes, and at any position NaN, +-inf, +-0, a subnormal or a
large value; options: residual, ReLU, and for spem_bn training or eval, running statistics
or none, weight and bias or None, momentum and eps.
"""
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted_hwnc", "permuted_wchn",
           "expanded_h", "expanded_c")
# The largest tensors drawn (elements): the native kernels take them in milliseconds; the
# Triton interpreter's limit is its path's (fuzz_paths).
MAX_ELEMENTS = 3000


def large(dtype):
    """A large magnitude of `dtype` that float32 computation carries through every sum of
    the op without overflow (sums of up to MAX_ELEMENTS products of two such values stay
    below float32's 3.4e38); float16 outputs may still round to inf, as SPEM.md allows."""
    return 3e4 if dtype == torch.float16 else 1e15


def subnormal(dtype):
    """A subnormal of `dtype` (a third of its smallest normal)."""
    return torch.finfo(dtype).tiny / 3


SPECIALS = {
    "nan": lambda d: float("nan"), "inf": lambda d: float("inf"),
    "-inf": lambda d: float("-inf"), "zero": lambda d: 0.0, "-zero": lambda d: -0.0,
    "subnormal": subnormal, "-subnormal": lambda d: -subnormal(d),
    "large": large, "-large": lambda d: -large(d),
}
# Value recipes (Values.kind): see Values.make.
KINDS = ("normal", "ints", "equal", "offset", "tiny", "large")


@dataclass(frozen=True)
class Values:
    """A tensor's values: `kind` filled from a seeded generator at `scale`, then `specials`,
    ((index in NCHW order, name in SPECIALS), ...), written over it."""
    kind: str = "normal"
    seed: int = 0
    scale: float = 1.0
    specials: tuple = ()

    def make(self, shape, dtype):
        gen = torch.Generator().manual_seed(self.seed)
        randn = torch.randn(shape, generator=gen, dtype=torch.float64)
        if self.kind == "normal":
            v = randn * self.scale
        elif self.kind == "ints":  # few distinct values: ties everywhere, across lanes too
            v = torch.randint(-2, 3, shape, generator=gen).double() * self.scale
        elif self.kind == "equal":
            v = torch.full(shape, self.scale, dtype=torch.float64)
        elif self.kind == "offset":  # distinct in float32, ties once rounded to 16 bits
            v = 100 * self.scale + randn * 0.01 * self.scale
        elif self.kind == "tiny":  # subnormals and the smallest normals of dtype
            v = randn * (4 * torch.finfo(dtype).tiny)
        elif self.kind == "large":
            v = randn * large(dtype)
        else:
            raise ValueError(f"unknown value kind {self.kind!r}")
        flat = v.reshape(-1)
        for index, name in self.specials:
            flat[index] = SPECIALS[name](dtype)
        return v.to(dtype)


def in_layout(t, kind):
    """t's values (NCHW) in the memory layout `kind`: the view itself, never a dense copy of
    it. The expanded kinds keep t's first row (channel) and repeat it with stride 0."""
    N, C, H, W = t.shape
    if kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":  # NaN around the view: a read past it shows
        big = torch.full((N + 1, 2 * C + 1, H + 2, 2 * W), float("nan"), dtype=t.dtype)
        view = big[1:, 1::2, 1:-1, ::2]
    elif kind == "permuted_hwnc":  # channels innermost, planes not flat
        view = torch.empty(H, W, N, C, dtype=t.dtype).permute(2, 3, 0, 1)
    elif kind == "permuted_wchn":  # samples innermost, w the outermost axis
        view = torch.empty(W, C, H, N, dtype=t.dtype).permute(3, 1, 2, 0)
    elif kind == "expanded_h":
        return t[:, :, :1].expand(N, C, H, W)
    elif kind == "expanded_c":
        return t[:, :1].expand(N, C, H, W)
    else:
        raise ValueError(f"unknown layout {kind!r}")
    view.copy_(t)
    return view


@dataclass(frozen=True)
class Params:
    """SPEM's parameters: w1, b1, w2, b2 (C each, shaped (C,) or (1, C, 1, 1)) uniform in
    [-scale, scale] from `seed`, with `zeros` (indices into the 4 C values) set to 0; the pair
    p; all in `dtype` (None: the compute dtype of x)."""
    seed: int = 0
    scale: float = 1.0
    zeros: tuple = ()
    p: tuple = (0.5, 0.5)
    four_d: bool = False
    dtype: str = None

    def make(self, C, x_dtype):
        dtype = DTYPES[self.dtype] if self.dtype else (
            torch.float64 if x_dtype == torch.float64 else torch.float32)
        gen = torch.Generator().manual_seed(self.seed)
        v = (torch.rand(4 * C, generator=gen, dtype=torch.float64) * 2 - 1) * self.scale
        v[list(self.zeros)] = 0
        shape = (1, C, 1, 1) if self.four_d else (C,)
        return [t.reshape(shape).to(dtype) for t in v.split(C)] + [
            torch.tensor(self.p, dtype=dtype)]


@dataclass(frozen=True)
class SpemCase:
    """One example of spem: x, the parameters, the residual (None without), and the
    gradient reaching the output, each in its layout (x, residual, grad_out)."""
    shape: tuple
    dtype: str
    x: Values
    params: Params
    residual: Values
    grad: Values
    layouts: tuple = ("contiguous",) * 3
    relu: bool = False

    def tensors(self):
        """[x, w1, b1, w2, b2, p, residual], grad_out."""
        dtype = DTYPES[self.dtype]
        x = in_layout(self.x.make(self.shape, dtype), self.layouts[0])
        res = (in_layout(self.residual.make(self.shape, dtype), self.layouts[1])
               if self.residual is not None else None)
        grad = in_layout(self.grad.make(self.shape, dtype), self.layouts[2])
        return [x, *self.params.make(self.shape[1], dtype), res], grad


@dataclass(frozen=True)
class BnCase:
    """One example of spem_bn: a SpemCase whose x is BatchNorm's input y, and BatchNorm's
    options. Running statistics (mean uniform in [-1, 1], variance in [0, 2]) and weight
    (uniform in [-2, 2], so some channels swap max and min) and bias (in [-1, 1]) come from
    `bn_seed`, in the parameters' dtype; `weight_zero`: a channel whose weight is 0."""
    spem: SpemCase
    training: bool = True
    running: bool = True
    weight: bool = True
    bias: bool = True
    weight_zero: int = None
    momentum: float = 0.1
    eps: float = 1e-5
    bn_seed: int = 0

    def tensors(self):
        """[y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual],
        grad_out."""
        (y, *params, res), grad = self.spem.tensors()
        C, dtype = y.shape[1], params[0].dtype
        gen = torch.Generator().manual_seed(self.bn_seed)

        def uniform(low, high):
            return (torch.rand(C, generator=gen, dtype=torch.float64) * (high - low)
                    + low).to(dtype)

        mean, var, weight, bias = uniform(-1, 1), uniform(0, 2), uniform(-2, 2), uniform(-1, 1)
        if self.weight_zero is not None:
            weight[self.weight_zero % C] = 0
        return [y, mean if self.running else None, var if self.running else None,
                weight if self.weight else None, bias if self.bias else None, *params,
                res], grad


# --- strategies ---

def _specials(numel, max_count=3):
    return st.lists(st.tuples(st.integers(0, numel - 1), st.sampled_from(tuple(SPECIALS))),
                    max_size=max_count).map(tuple)


def values(numel, kinds=KINDS):
    """A Values recipe for a tensor of `numel` elements: mostly plain normal values, the other
    kinds and the specials drawn often enough to be met in a few hundred examples."""
    return st.builds(
        Values, kind=st.sampled_from(kinds), seed=st.integers(0, 2**16),
        scale=st.sampled_from((1.0, 1e-3, 1e3, 0.5)), specials=_specials(numel))


@st.composite
def shapes(draw, max_elements=MAX_ELEMENTS):
    """(N, C, H, W), at most max_elements. W goes past 16 and 32 (a row of more than one
    vector plus a scalar tail), C past 16 (a channels_last group and its tail)."""
    H = draw(st.integers(1, 12))
    W = draw(st.integers(1, 40))
    C = draw(st.integers(1, max(1, min(20, max_elements // (H * W)))))
    N = draw(st.integers(1, max(1, min(4, max_elements // (C * H * W)))))
    return (N, C, H, W)


@st.composite
def params(draw, C):
    return Params(
        seed=draw(st.integers(0, 2**16)), scale=draw(st.sampled_from((1.0, 0.1, 4.0))),
        zeros=tuple(draw(st.lists(st.integers(0, 4 * C - 1), max_size=2))),
        p=draw(st.tuples(*[st.sampled_from((0.5, -1.0, 0.1, 3.0, 0.0))] * 2)),
        four_d=draw(st.booleans()), dtype=draw(st.sampled_from((None, None, "float64"))))


@st.composite
def spem_cases(draw, max_elements=MAX_ELEMENTS, kinds=KINDS):
    shape = draw(shapes(max_elements))
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    layouts = st.sampled_from(LAYOUTS)
    return SpemCase(
        shape=shape, dtype=draw(st.sampled_from(tuple(DTYPES))),
        x=draw(values(numel, kinds)), params=draw(params(shape[1])),
        residual=draw(st.none() | values(numel)),
        grad=draw(st.builds(Values, seed=st.integers(0, 2**16), specials=_specials(numel, 1))),
        layouts=(draw(layouts), draw(layouts), draw(layouts)), relu=draw(st.booleans()))


# BatchNorm of y values from these recipes: its statistics in float32 stay within rounding
# of float64's (SPEM.md: computed in float32). "tiny" y in training would have a variance
# that float32 cannot hold (squares of subnormals are 0), "large" one past float32's range
# at these counts: float32 math, not a kernel's choice; spem's own cases draw them.
BN_KINDS = ("normal", "ints", "equal", "offset")


@st.composite
def bn_cases(draw, max_elements=MAX_ELEMENTS):
    case = draw(spem_cases(max_elements, BN_KINDS))
    training = draw(st.booleans())
    N, C, H, W = case.shape
    if training and N * H * W == 1:  # BatchNorm needs two values per channel to train
        case = SpemCase(**{**case.__dict__, "shape": (2, C, H, W)})
    return BnCase(
        spem=case, training=training,
        running=draw(st.booleans()) if training else True,
        weight=draw(st.booleans()), bias=draw(st.booleans()),
        weight_zero=draw(st.none() | st.integers(0, 19)),
        momentum=draw(st.sampled_from((0.1, 0.0, 1.0, 0.5))),
        eps=draw(st.sampled_from((1e-5, 1e-3))), bn_seed=draw(st.integers(0, 2**16)))
