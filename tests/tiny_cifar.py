"""Tiny CIFAR data sets in the official on-disk format, for the tests that read or train on
them (test_data, test_training, test_cuda_graph): Python 2 pickles of dicts with b'data'
uint8 (n, 3072) and b'labels' / b'fine_labels', as the official archives hold.

A helper module, not a test file: test files import it; it imports only spem_kernels.data.
"""
import dataclasses
import io
import os
import pickle
import struct

import numpy as np

from spem_kernels.data import cifar


def make_batch(n, num_classes, seed):
    """n learnable images: a per-class colour plus noise (so a tiny net can fit them)."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(12345).integers(0, 200, (num_classes, 3))
    labels = rng.integers(0, num_classes, n)
    images = rng.integers(0, 56, (n, 3, 32, 32)) + palette[labels][:, :, None, None]
    return images.astype(np.uint8).reshape(n, 3072), labels.tolist()


class _Py2Pickler(pickle._Pickler):
    """Writes what the official files are: Python 2 protocol-2 pickles, where bytes are py2
    strings (BINSTRING) and arrays come from numpy.core.multiarray._reconstruct. (Python 3's
    own protocol 2 would route bytes through _codecs.encode, which those files never hold.)"""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj):
    out = io.BytesIO()
    _Py2Pickler(out, protocol=2).dump(obj)
    return out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def dump(obj, path):
    with open(path, "wb") as f:
        f.write(py2_pickle(obj))


def write_cifar(root, name="cifar10", train_sizes=(12, 7, 9, 5, 3), test_size=10, seed=0):
    """A tiny data set in the official extracted layout under `root`; returns its folder."""
    spec = cifar.SPECS[name]
    folder = os.path.join(root, spec.folder)
    os.makedirs(folder, exist_ok=True)
    num_classes = 10 if name == "cifar10" else 100
    if name == "cifar100":
        train_sizes = (sum(train_sizes),)
    for i, (file, n) in enumerate(zip(spec.train + spec.test, train_sizes + (test_size,))):
        data, labels = make_batch(n, num_classes, seed + i)
        batch = {b"data": data, spec.label_key: labels, b"filenames": [b"x.png"] * n,
                 b"batch_label": b"batch"}
        if name == "cifar100":
            batch[b"coarse_labels"] = [label // 5 for label in labels]
        dump(batch, os.path.join(folder, file))
    names = [f"class{i}".encode() for i in range(num_classes)]
    dump({spec.names_key: names, b"num_cases_per_batch": 10}, os.path.join(folder, spec.meta))
    return folder


def patch_spec(monkeypatch, name, **changes):
    """Change data set `name`'s spec (URL, MD5, ...) for one test."""
    monkeypatch.setitem(cifar.SPECS, name, dataclasses.replace(cifar.SPECS[name], **changes))
