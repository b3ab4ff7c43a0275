"""BatchNorm's backward coefficients have one home, csrc/spem_bn_math.h, which the CPU and CUDA
kernels call; the Triton kernels write the same expressions in Triton. Here the header itself
(compiled on its own with the C++ compiler: it includes no torch) computes dbias, dweight,
k2 and k3 from the sums that the Triton parameter-gradient kernel sums, and the two must
agree to the bit, in training and in eval."""
import os
import subprocess

import pytest
import torch

from spem_kernels.backends import unavailable_reason

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
PROBE = r"""
#include <cstdio>
#include "spem_bn_math.h"
// stdin: sum_dx sum_dx_dev invstd count training (as %a floats, training 0/1), one channel a
// line; stdout: dbias k2 dweight k3, as the header computes them in float32.
int main() {
  float sdx, sdxd, invstd, count;
  int training;
  while (std::scanf("%a %a %a %a %d", &sdx, &sdxd, &invstd, &count, &training) == 5) {
    float dbias, k2, dweight, k3;
    spem_native::bn_bias_grads(sdx, count, training != 0, &dbias, &k2);
    spem_native::bn_weight_grads(sdxd, invstd, count, training != 0, &dweight, &k3);
    std::printf("%a %a %a %a\n", dbias, k2, dweight, k3);
  }
}
"""


@pytest.fixture(scope="module")
def header(tmp_path_factory):
    """A program that runs spem_bn_math.h's coefficient functions on its input lines."""
    folder = tmp_path_factory.mktemp("bn_math")
    (folder / "probe.cpp").write_text(PROBE)
    cxx = os.environ.get("CXX", "g++")
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{CSRC}", str(folder / "probe.cpp"), "-o",
                    str(folder / "probe")], check=True, capture_output=True)

    def run(rows):
        text = "".join(" ".join([*(float(v).hex() for v in row[:4]), str(int(row[4]))]) + "\n"
                       for row in rows)
        out = subprocess.run([str(folder / "probe")], input=text, capture_output=True,
                             text=True, check=True).stdout
        return torch.tensor([[float.fromhex(v) for v in line.split()]
                             for line in out.splitlines()], dtype=torch.float32)
    return run


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_coefficients_are_the_headers(header, training):
    if unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("Triton does not run here")
    from spem_kernels.backends import triton_backend as tb
    from spem_kernels.backends import triton_kernels as tk

    N, C, count = 1, 37, 49  # one sample: the sums over n are the partials, in any order
    part = torch.randn(tk.BN_PLANES, N, C)
    invstd = torch.rand(C) + 0.5
    p = torch.randn(2)
    grads = [torch.empty(C) for _ in range(4)] + [torch.empty(2)]
    dweight, dbias, coef = torch.empty(C), torch.empty(C), torch.empty(2, C)
    tb._grads_kernel(*tb.grads_launch(part, p, *grads,
                                      bn=(invstd, dweight, dbias, coef, count, training)),
                     torch.device("cpu"))
    sums = part[tk.PARTIALS, 0], part[tk.PARTIALS + 1, 0]  # of dx, of dx (y - mean)
    want = header([(sums[0][c], sums[1][c], invstd[c], count, training) for c in range(C)])
    got = torch.stack([dbias, coef[0], dweight, coef[1]], dim=1)
    assert torch.equal(got, want)
