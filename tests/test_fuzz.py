"""Property-based differential tests (hypothesis, marker `fuzz`) of every path that runs here
(fuzz_paths.PATHS: the native CPU kernels, through the public op and through their ops
called directly, Triton in its interpreter, export.py's standard-op compositions), each
drawn example against the float64 reference by the rules of fuzz_checks.

Examples are drawn by fuzz_cases (shapes, layouts, dtypes, values with NaN, infinities,
subnormals and large magnitudes at any position, options). Profiles (tests/conftest.py):
the default `ci` is derandomized and bounded; HYPOTHESIS_PROFILE=long draws thousands,
from a fresh seed each run. A failure prints the shrunk case, whose repr pastes back as
`@example(...)` above the test (and a @reproduce_failure blob); every failure found and
fixed stays below as such an example, with what it found.
"""
import pytest
from hypothesis import assume, event, example, given

from fuzz_cases import BnCase, Params, SpemCase, Values, bn_cases, spem_cases
from fuzz_checks import failures, spem_bn_expected, spem_expected
from fuzz_paths import PATHS

pytestmark = pytest.mark.fuzz


def check_paths(case, numel, run, expected):
    """Runs every available path that takes `numel` elements (run(path) -> Result) and
    asserts that each keeps the rules against `expected`."""
    problems = []
    for name, path in PATHS.items():
        reason = path.unavailable()
        if reason is not None:
            event(f"{name} unavailable")
            continue
        if path.max_elements is not None and numel > path.max_elements:
            continue
        event(f"ran {name}")
        problems += [f"{name}: {line}"
                     for line in failures(run(path), expected, path.rounding)]
    assert not problems, "\n".join(problems + [f"reproduce: @example({case!r})"])


@given(spem_cases())
# An infinite grad_out: p's gradient is +-inf (SPEM.md's D), where autograd of the eager
# reference gives NaN (inf - inf of dq0 and dq1): the reference was wrong.
@example(SpemCase(shape=(1, 1, 1, 2), dtype="float32", x=Values(), params=Params(),
                  residual=None, grad=Values(specials=((0, "inf"),))))
def test_spem(case):
    tensors, grad_out = case.tensors()
    expected = spem_expected(tensors, grad_out, case.relu)
    check_paths(case, tensors[0].numel(),
                lambda path: path.spem(tensors, expected.grad_out, case.relu), expected)


@given(bn_cases())
# Normalising a large value with three small ones rounds those three to one float32 value:
# a tie the float64 reference does not have. The max's term may go to either of the near-tied
# positions (fuzz_checks): the checks were too strict.
@example(BnCase(spem=SpemCase(shape=(2, 1, 1, 2), dtype="float32",
                              x=Values(specials=((0, "large"),)), params=Params(),
                              residual=None, grad=Values()), running=False, weight=False,
                bias=False))
# A gradient (or y) strided like channels_last beside an NCHW y (gradient): torch's own
# batch_norm backward, the reference's, misreads it (fuzz_checks.reference_grad): the
# reference was wrong; it now computes on dense copies.
@example(BnCase(spem=SpemCase(shape=(1, 2, 1, 2), dtype="float32", x=Values(),
                              params=Params(), residual=None, grad=Values(),
                              layouts=("contiguous", "contiguous", "permuted_hwnc")),
                training=False, weight=False, bias=False))
@example(BnCase(spem=SpemCase(shape=(1, 2, 1, 2), dtype="float32", x=Values(),
                              params=Params(), residual=None, grad=Values(),
                              layouts=("permuted_hwnc", "contiguous", "contiguous")),
                training=False, weight=False, bias=False))
# Running statistics in float64 beside float32 y: export.spem_bn normalised with float32
# copies of them, which batch_norm updated, and left the buffers as they were (fixed).
@example(BnCase(spem=SpemCase(shape=(2, 1, 1, 1), dtype="float32", x=Values(),
                              params=Params(dtype="float64"), residual=None, grad=Values()),
                weight=False, bias=False))
# Triton's interpreter truncates float32 to bfloat16 (fuzz_paths): a whole ulp off.
@example(BnCase(spem=SpemCase(shape=(1, 1, 1, 1), dtype="bfloat16", x=Values(seed=1),
                              params=Params(), residual=None, grad=Values()),
                training=False, weight=False, bias=False))
# An infinite y in eval: dy = alpha (dx - k2 - (y - mean) k3) gave inf * 0 = NaN where
# k3 = 0 (eval), and BatchNorm's gradient is alpha dx: the kernels now leave the zero term
# out (CPU, Triton).
@example(BnCase(spem=SpemCase(shape=(1, 1, 2, 1), dtype="float32",
                              x=Values(specials=((0, "inf"),)), params=Params(),
                              residual=None, grad=Values(),
                              layouts=("expanded_h", "contiguous", "contiguous")),
                training=False, weight=False, bias=False))
# An infinite gradient with a zero bias: S = alpha SD + bias SG gave 0 * inf = NaN where the
# reference's sum G x is +-inf (SPEM's parameter gradients); the kernels now leave a zero
# bias's term out (bn_spem_S, all backends).
@example(BnCase(spem=SpemCase(shape=(1, 1, 1, 1), dtype="float32", x=Values(),
                              params=Params(), residual=None,
                              grad=Values(specials=((0, "inf"),))),
                training=False, weight=False, bias=False))
def test_spem_bn(case):
    # With a nonzero bias, an infinite gradient may still give NaN for +-inf there (inf - inf
    # of S's two terms): both non-finite, the difference SPEM.md states.
    assume(not (case.bias and any(name in ("inf", "-inf")
                                  for _, name in case.spem.grad.specials)))
    tensors, grad_out = case.tensors()
    expected = spem_bn_expected(tensors, grad_out, case.training, case.momentum, case.eps,
                                case.spem.relu)
    check_paths(case, tensors[0].numel(),
                lambda path: path.spem_bn(tensors, expected.grad_out, case.training,
                                          case.momentum, case.eps, case.spem.relu), expected)
