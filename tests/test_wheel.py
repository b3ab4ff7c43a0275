"""Packaging: a wheel built from this tree carries the compiled extension and works far from
the checkout; and the loader's choice between that extension and the build made on first use.

The wheel is built once per session (`pip wheel --no-build-isolation`, as README "Install"
says; about two minutes here, most of it the compiler) from a copy of the tree's build inputs,
so the checkout gets no build/ folder and concurrent runs do not share one.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from spem_kernels.backends import native_build

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "SPEM.md", "csrc",
                "spem_kernels")
DEVICES = ["cpu"]
if torch.cuda.is_available() and native_build.can_build_cuda():  # the wheel has CUDA kernels
    DEVICES.append("cuda")


def pip(*args):
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    """(wheel, site): the wheel built from a copy of the tree, installed into its own folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():  # symlinks=True: spem_kernels/csrc stays a link, as in git
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", native_build.PREBUILT.stem + ".*"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip("wheel", "--no-build-isolation", "--no-deps", "-q", str(src), "-w", str(tmp / "dist"))
    (wheel,) = (tmp / "dist").glob("spem_kernels-*.whl")
    pip("install", "--no-deps", "--no-index", "-q", "--target", str(tmp / "site"), str(wheel))
    return wheel, tmp / "site"


def run_installed(site, tmp_path, *args):
    """Runs Python from another folder with only the installed copy importable (torch comes
    from this interpreter's own site-packages) and an empty kernel cache."""
    cache, cwd = tmp_path / "cache", tmp_path / "elsewhere"
    cache.mkdir()
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site),
           "SPEM_KERNELS_CACHE": str(cache), "TORCH_EXTENSIONS_DIR": str(cache / "torch")}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, cache


def test_wheel_carries_extension_and_sources(wheel_install):
    wheel, _ = wheel_install
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"spem_kernels/_spem_native.so", "spem_kernels/_spem_native.json"} <= names
    sources = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h")}
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("spem_kernels/csrc/")} == sources
    record = json.loads(zipfile.ZipFile(wheel).read("spem_kernels/_spem_native.json"))
    assert record["torch"] == torch.__version__
    assert record["cuda"] == (torch.version.cuda if native_build.can_build_cuda() else None)


def test_installed_package_runs_prebuilt_native(wheel_install, tmp_path):
    _, site = wheel_install
    check = textwrap.dedent(f"""
        import torch, spem_kernels
        from spem_kernels import available_backends, spem, spem_reference
        from spem_kernels.backends import native_build
        assert spem_kernels.__file__.startswith({str(site)!r}), spem_kernels.__file__
        for device in {DEVICES!r}:
            assert "native" in available_backends(device), device
            torch.manual_seed(0)
            x, res = (torch.randn(2, 6, 5, 7, dtype=torch.float64, device=device,
                                  requires_grad=True) for _ in range(2))
            params = [torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
                      for _ in range(4)]
            p = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
            inputs = (x, *params, p, res)
            grads = []
            for fn, backend in ((spem, "native"), (spem_reference, "eager")):
                out = fn(x, *params, p, res, relu=True, backend=backend)
                grads.append((out, *torch.autograd.grad(out.square().sum(), inputs)))
            for got, want in zip(*grads):
                torch.testing.assert_close(got, want)
        assert native_build.prebuilt_reason is None, native_build.prebuilt_reason
        assert torch.ops.loaded_libraries == {{str(native_build.PREBUILT)}}
        print("ok", native_build.PREBUILT)
        """)
    result, cache = run_installed(site, tmp_path, "-c", check)
    assert result.stdout.startswith(f"ok {site.resolve()}")
    assert "building" not in result.stderr
    assert not any(cache.iterdir())  # nothing compiled, nothing written


def test_installed_trainer_runs(wheel_install, tmp_path):
    _, site = wheel_install
    result, _ = run_installed(site, tmp_path, "-m", "spem_kernels.train", "--help")
    assert "--dataset" in result.stdout and "--backend" in result.stdout


# --- the loader's choice, without a build: a fake packaged extension and record ---

@pytest.fixture
def fake_prebuilt(tmp_path, monkeypatch):
    """A packaged extension whose record matches this machine; tests change one field."""
    so, record = tmp_path / "_spem_native.so", tmp_path / "_spem_native.json"
    so.write_bytes(b"not a library")
    fields = {"torch": torch.__version__, "cuda": None, "cuda_arch": None, "march": "native",
              "cpu_flags": sorted(native_build._cpu_flags() & {"avx2", "sse4_2"}),
              "sources": native_build.sources_digest(False)}
    monkeypatch.setattr(native_build, "PREBUILT", so)
    monkeypatch.setattr(native_build, "PREBUILT_RECORD", record)

    def write(**changes):
        record.write_text(json.dumps({**fields, **changes}))
    write()
    return write


def test_prebuilt_record_that_fits(fake_prebuilt):
    record, why = native_build._prebuilt_record()
    assert why is None and record == json.loads(native_build.PREBUILT_RECORD.read_text())


@pytest.mark.parametrize("change,reason", [
    ({"torch": "1.0.0"}, "built for torch 1.0.0"),
    ({"cpu_flags": ["avx2", "no_such_isa"]}, "this CPU lacks no_such_isa"),
    ({"sources": "0" * 64}, "changed since it was built"),
])
def test_prebuilt_that_does_not_fit(fake_prebuilt, change, reason):
    fake_prebuilt(**change)
    record, why = native_build._prebuilt_record()
    assert record is None and reason in why


def test_cuda_prebuilt_on_torch_without_cuda(fake_prebuilt, monkeypatch):
    fake_prebuilt(cuda="13.0")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "this torch has no CUDA" in native_build._prebuilt_record()[1]


def test_prebuilt_that_fails_to_load_falls_back_to_jit(fake_prebuilt, monkeypatch):
    built = []
    monkeypatch.setattr(native_build, "prebuilt_reason", None)  # restored afterwards
    monkeypatch.setattr(native_build, "can_build_cuda", lambda: False)
    monkeypatch.setattr(native_build, "_load_library", lambda with_cuda: built.append(with_cuda))
    reasons = native_build.load()
    assert built == [False] and reasons["cpu"] is None
    assert native_build.prebuilt_reason.startswith("it does not load")


def test_sources_split():
    on_disk = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu"))
    cpu, everything = native_build.sources(False), native_build.sources(True)
    assert everything == on_disk and set(cpu) < set(everything)
    assert not any(name.endswith(".cu") or "cuda" in name for name in cpu)


def test_isa_flags_from_compiler_macros():
    macros = "#define __AVX2__ 1\n#define __SSE4_2__ 1\n#define __AES__ 1\n#define __x86_64 1"
    assert native_build.isa_flags(macros) == ["avx2", "sse4_2"]
