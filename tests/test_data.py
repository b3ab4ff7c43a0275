"""CIFAR loading without torchvision: layouts, archive, download, safety, augmentation.

The data sets here are tiny but in the official on-disk format (tiny_cifar writes them).
"""
import collections
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from spem_kernels.data import cifar
from spem_kernels.data.cifar import CifarLoader, crop_flip, load_cifar
from tiny_cifar import dump, make_batch, patch_spec, py2_pickle, write_cifar

pytestmark = pytest.mark.usefixtures("one_thread")


def make_archive(src_root, name, dest):
    spec = cifar.SPECS[name]
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(os.path.join(src_root, spec.folder), arcname=spec.folder)
    return hashlib.md5(open(dest, "rb").read()).hexdigest()


# --- layouts ---

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reads_extracted_layout(tmp_path, name):
    folder = write_cifar(tmp_path, name)
    spec = cifar.SPECS[name]
    data = load_cifar(name, tmp_path, download=False)
    assert data.train_images.shape == (36, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10, 3, 32, 32)
    assert data.train_labels.dtype == torch.int64
    first = pickle.load(open(os.path.join(folder, spec.train[0]), "rb"), encoding="bytes")
    # row layout of the official format: 1024 red, then green, then blue, row-major
    assert torch.equal(data.train_images[0], torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)))
    assert data.train_labels[:len(first[spec.label_key])].tolist() == first[spec.label_key]


def test_reads_arrays_under_either_numpy_module_name():
    """The official files name numpy.core.multiarray; numpy 2 writes numpy._core.multiarray."""
    data, labels = make_batch(4, 10, 1)
    blob = py2_pickle({b"data": data, b"labels": labels})
    assert b"cnumpy.core.multiarray\n_reconstruct" in blob and b"_codecs" not in blob
    for named in (blob, blob.replace(b"cnumpy.core.", b"cnumpy._core.")):
        batch = cifar._BatchUnpickler(io.BytesIO(named), encoding="bytes").load()
        assert np.array_equal(batch[b"data"], data) and batch[b"labels"] == labels


# --- archive and download ---

def test_archive_is_md5_checked_and_extracted(tmp_path, monkeypatch):
    write_cifar(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    md5 = make_archive(tmp_path / "src", "cifar10", root / "cifar-10-python.tar.gz")
    patch_spec(monkeypatch, "cifar10", md5="0" * 32)
    with pytest.raises(ValueError, match="MD5"):
        load_cifar("cifar10", root, download=False)
    assert not (root / "cifar-10-batches-py").exists()
    patch_spec(monkeypatch, "cifar10", md5=md5)
    data = load_cifar("cifar10", root, download=False)
    assert len(data.train_labels) == 36
    assert not [p for p in os.listdir(root) if p.startswith(".")]  # no temporary left over


def test_download_verifies_then_extracts(tmp_path, monkeypatch):
    write_cifar(tmp_path / "src")
    served = tmp_path / "served.tar.gz"
    md5 = make_archive(tmp_path / "src", "cifar10", served)
    root = tmp_path / "root"
    patch_spec(monkeypatch, "cifar10", url=served.as_uri(), md5="f" * 32)
    with pytest.raises(ValueError, match="MD5"):
        load_cifar("cifar10", root)
    assert os.listdir(root) == []  # the bad download was not kept
    patch_spec(monkeypatch, "cifar10", url=served.as_uri(), md5=md5)
    data = load_cifar("cifar10", root)
    assert len(data.test_labels) == 10
    assert (root / "cifar-10-python.tar.gz").is_file()


def _tar_with(path, folder, member, payload=b"x"):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo(f"{folder}/test_batch")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        if member.isreg():
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        else:
            tar.addfile(member)


def _symlink(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _device(name):
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


@pytest.mark.parametrize("member, why", [
    (tarfile.TarInfo("cifar-10-batches-py/../../evil"), "leaves the folder"),
    (tarfile.TarInfo("/tmp/evil"), "leaves the folder"),
    (_symlink("cifar-10-batches-py/data_batch_1", "/etc/passwd"), "link or device"),
    (_device("cifar-10-batches-py/data_batch_1"), "link or device"),
    (tarfile.TarInfo("elsewhere/file"), "outside"),
])
def test_malicious_archive_is_refused_before_writing(tmp_path, monkeypatch, member, why):
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "cifar-10-python.tar.gz"
    _tar_with(archive, "cifar-10-batches-py", member)
    patch_spec(monkeypatch, "cifar10", md5=hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match=why):
        load_cifar("cifar10", root, download=False)
    assert sorted(os.listdir(root)) == ["cifar-10-python.tar.gz"]
    assert not (tmp_path / "evil").exists()


# --- bad files and the restricted unpickler ---

class _RunsShell:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("payload", [
    pickle.dumps(_RunsShell()),
    pickle.dumps({b"data": _RunsShell(), b"labels": []}, protocol=4),
    pickle.dumps(eval, protocol=4),
    pickle.dumps(collections.Counter("ab")),
])
def test_unpickler_refuses_everything_but_arrays(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    folder = write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(payload)
    with pytest.raises(ValueError, match=r"data_batch_2.*refusing to load"):
        load_cifar("cifar10", tmp_path, download=False)
    assert not (tmp_path / "pwned").exists()
    assert folder


@pytest.mark.parametrize("batch, match", [
    (b"not a pickle at all", "not a readable CIFAR batch"),
    ({b"labels": [1]}, "expected a dict with b'data'"),
    ([1, 2, 3], "expected a dict"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8 array"),
    ({b"data": np.zeros((2, 1000), np.uint8), b"labels": [0, 1]}, r"shape \(n, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 integer labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"in \[0, 10\)"),
])
def test_bad_batch_files_name_the_file(tmp_path, batch, match):
    folder = write_cifar(tmp_path)
    path = os.path.join(folder, "test_batch")
    if isinstance(batch, bytes):
        open(path, "wb").write(batch)
    else:
        dump(batch, path)
    with pytest.raises(ValueError, match=match) as err:
        load_cifar("cifar10", tmp_path, download=False)
    assert "test_batch" in str(err.value)


def test_meta_file_without_class_names_is_refused(tmp_path):
    folder = write_cifar(tmp_path)
    dump({b"num_cases_per_batch": 10}, os.path.join(folder, "batches.meta"))
    with pytest.raises(ValueError, match=r"batches.meta: expected a dict with b'label_names'"):
        load_cifar("cifar10", tmp_path, download=False)


def test_missing_data_names_what_and_where(tmp_path, monkeypatch):
    patch_spec(monkeypatch, "cifar10", url=(tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(FileNotFoundError) as err:
        load_cifar("cifar10", tmp_path / "data")
    msg = str(err.value)
    for part in ("cifar-10-batches-py", "data_batch_1", "test_batch", "batches.meta",
                 "cifar-10-python.tar.gz", str(tmp_path / "data"), "downloading", "--data-dir"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="downloading is off"):
        load_cifar("cifar100", tmp_path / "data", download=False)
    folder = write_cifar(tmp_path / "partial")
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(FileNotFoundError, match="incomplete: missing data_batch_3"):
        load_cifar("cifar10", tmp_path / "partial")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set"):
        load_cifar("mnist", ".")


# --- on-device batches ---

def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    shifts = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.randint(0, 2, (16,), generator=g).bool()
    out = crop_flip(images, shifts, flips)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(16):
        dy, dx = shifts[i].tolist()
        ref = padded[i, :, dy:dy + 32, dx:dx + 32]
        assert torch.equal(out[i], ref.flip(-1) if flips[i] else ref)


def test_loader_normalises_and_keeps_order_for_testing():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(10)
    batches = list(CifarLoader(images, labels, 4, "cpu", train=False))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    mean = torch.tensor(cifar.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cifar.STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


def test_train_shards_are_disjoint_deterministic_and_channels_last():
    images = torch.arange(11).view(11, 1, 1, 1).expand(11, 3, 32, 32).to(torch.uint8).clone()
    labels = torch.arange(11)

    def epoch(rank, seed=3):
        loader = CifarLoader(images, labels, 2, "cpu", train=True, seed=seed, rank=rank,
                             world_size=2, channels_last=True)
        batches = list(loader)
        assert len(batches) == len(loader) == 3
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
        return torch.cat([y for _, y in batches]).tolist()

    a, b = epoch(0), epoch(1)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert epoch(0) == a and epoch(0, seed=4) != a
    single = CifarLoader(images, labels, 11, "cpu", train=True, seed=3)
    first, second = [torch.cat([y for _, y in single]).tolist() for _ in range(2)]
    assert first != second and sorted(first) == list(range(11))  # a new order each epoch


def test_train_loader_state_carries_the_next_epochs():
    """set_state(get_state()) on a fresh loader (another seed) gives the same next epochs:
    what a resumed run relies on."""
    images = torch.arange(11).view(11, 1, 1, 1).expand(11, 3, 32, 32).to(torch.uint8).clone()
    labels = torch.arange(11)

    def epoch(loader):
        batches = list(loader)
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    saved = CifarLoader(images, labels, 4, "cpu", train=True, seed=3)
    epoch(saved)  # one epoch in
    state = saved.get_state()
    restored = CifarLoader(images, labels, 4, "cpu", train=True, seed=5)
    restored.set_state(state)
    for _ in range(2):
        for a, b in zip(epoch(saved), epoch(restored)):
            assert torch.equal(a, b)
