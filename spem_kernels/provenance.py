"""What ran a measurement or a training run: the device's name, the package versions and
the git commit of the code. The trainer writes them into its checkpoints (so a run made in
pieces on several machines says which), the performance report into its results.
"""
import importlib.metadata
import os
import platform
import re
import subprocess

import torch

# The packages whose versions decide what a run computes and how fast.
PACKAGES = ("torch", "triton", "numpy")


def device_name(device):
    """The GPU's name, or the CPU's model name (/proc/cpuinfo), for a torch device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    except OSError:
        names = []
    return names[0].strip() if names else platform.processor() or "cpu"


def versions():
    """{name: version} of Python, CUDA (torch's build), spem_kernels and PACKAGES (those
    installed), read from the installed metadata: nothing is imported."""
    from . import __version__

    found = {"python": platform.python_version(), "spem_kernels": __version__,
             "cuda": torch.version.cuda}
    installed = {name: _installed_version(name) for name in PACKAGES}
    return found | {name: v for name, v in installed.items() if v is not None}


def _installed_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def commit():
    """The git commit of the checkout this package runs from ("<hash>-dirty" where tracked
    files differ from it), or None where it is not a git checkout (an installed wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=30)
    try:
        head = git("rev-parse", "--show-toplevel", "HEAD")
        if head.returncode:
            return None
        top, sha = head.stdout.split()
        if os.path.realpath(top) != os.path.realpath(root):  # a checkout of something else
            return None
        dirty = git("diff", "--quiet", "HEAD").returncode == 1
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return sha + ("-dirty" if dirty else "")
