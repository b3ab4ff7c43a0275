"""CIFAR-10/100 in the official python format, without torchvision.

Finds the extracted folder, or the archive (MD5-checked, extracted safely), or downloads it;
reads the pickled batches with an unpickler that builds numpy arrays and nothing else; and
serves batches from tensors that live on the training device, augmented there in one go.
"""
import dataclasses
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F

try:  # numpy >= 2 moved the array reconstructor; pickles name either module
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


@dataclasses.dataclass(frozen=True)
class CifarSpec:
    url: str
    md5: str
    archive: str          # file name of the downloaded archive
    folder: str           # top folder inside the archive
    train: tuple
    test: tuple
    meta: str
    label_key: bytes
    names_key: bytes

    def files(self):
        return self.train + self.test + (self.meta,)


SPECS = {
    "cifar10": CifarSpec(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a", "cifar-10-python.tar.gz", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        b"labels", b"label_names"),
    "cifar100": CifarSpec(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz", "cifar-100-python",
        ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names"),
}


@dataclasses.dataclass
class Cifar:
    """uint8 images (N, 3, 32, 32) and int64 labels (N,), on the CPU."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


# --- finding, downloading, extracting ---

def prepare(name, root, download=True):
    """The path of the extracted folder of data set `name` under `root`, making it from the
    archive (downloaded first when missing and `download`) if need be."""
    spec = _spec(name)
    folder = os.path.join(root, spec.folder)
    archive = os.path.join(root, spec.archive)
    if os.path.isdir(folder):
        missing = [f for f in spec.files() if not os.path.isfile(os.path.join(folder, f))]
        if missing:  # never overwrite a folder the user made
            raise FileNotFoundError(f"{folder} is incomplete: missing {', '.join(missing)}")
        return folder
    if not os.path.isfile(archive):
        if not download:
            raise FileNotFoundError(_missing_message(spec, root, "downloading is off"))
        try:
            _download(spec, archive)
        except OSError as e:  # no network, HTTP error, ...: a bad MD5 is a ValueError and passes
            raise FileNotFoundError(_missing_message(
                spec, root, f"downloading {spec.url} failed: {type(e).__name__}: {e}")) from e
    else:
        _check_md5(archive, spec, "delete it and try again")
    _safe_extract(archive, root, spec.folder)
    return folder


def _spec(name):
    if name not in SPECS:
        raise ValueError(f"unknown data set {name!r}; choose one of {tuple(SPECS)}")
    return SPECS[name]


def _missing_message(spec, root, why):
    root = os.path.abspath(root)
    return (f"CIFAR data not found: expected the folder {os.path.join(root, spec.folder)} "
            f"holding {', '.join(spec.files())}, or the archive "
            f"{os.path.join(root, spec.archive)} ({spec.url}); {why}. Put either there, or "
            f"point --data-dir at the folder that holds them.")


def _download(spec, archive):
    """Stream the archive to a temporary file beside `archive`, then move it into place."""
    os.makedirs(os.path.dirname(os.path.abspath(archive)), exist_ok=True)
    tmp = f"{archive}.{os.getpid()}.part"
    try:
        with open(tmp, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        _check_md5(tmp, spec, f"downloaded from {spec.url}")
        os.replace(tmp, archive)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_md5(path, spec, hint):
    digest = _md5(path)
    if digest != spec.md5:
        raise ValueError(f"{path} has MD5 {digest}, expected {spec.md5}: corrupt or not the "
                         f"official {spec.archive} ({hint})")


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_extract(archive, root, folder):
    """Extract `archive` (whose data sits under `folder`/) into `root`.

    Every member is checked before anything is written: only plain files and folders, with
    relative paths that stay inside `folder`. Extraction goes to a temporary folder first,
    so a failure never leaves a half-written data folder that would later look complete.
    """
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            parts = m.name.replace("\\", "/").split("/")
            if os.path.isabs(m.name) or m.name.startswith("/") or ".." in parts:
                raise ValueError(f"{archive}: refusing member {m.name!r}: path leaves the folder")
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: refusing member {m.name!r}: not a plain file or "
                                 f"folder (link or device)")
            if parts[0] != folder:
                raise ValueError(f"{archive}: refusing member {m.name!r}: outside {folder}/")
        tmp = tempfile.mkdtemp(dir=root, prefix=".extract-")
        try:
            tar.extractall(tmp, members=members, filter="data")
            if not os.path.isdir(os.path.join(tmp, folder)):
                raise ValueError(f"{archive} does not contain the folder {folder}/")
            os.replace(os.path.join(tmp, folder), os.path.join(root, folder))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --- reading the pickled batches ---

class _BatchUnpickler(pickle.Unpickler):
    """Builds only what CIFAR batch files hold: dicts, lists, bytes, ints and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch file holds only numpy "
                f"arrays, lists and bytes") from None


def read_pickle(path):
    """Unpickle a CIFAR file with the restricted unpickler; errors name the file."""
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a readable CIFAR batch file: "
                         f"{type(e).__name__}: {e}") from e


def read_batch(path, label_key, num_classes):
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) from one batch file."""
    batch = read_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path} is not a CIFAR batch: expected a dict with b'data' and "
                         f"{label_key!r}")
    data, labels = batch[b"data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (n, 3072), got "
                         f"{getattr(data, 'dtype', type(data).__name__)} "
                         f"{getattr(data, 'shape', '')}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" \
            or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"{path}: {label_key!r} must hold {len(data)} integer labels in "
                         f"[0, {num_classes})")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def load_cifar(name, root, download=True):
    """CIFAR-10 ("cifar10") or CIFAR-100 ("cifar100") from `root` (see prepare)."""
    spec = _spec(name)
    folder = prepare(name, root, download)
    num_classes = _read_num_classes(os.path.join(folder, spec.meta), spec.names_key)

    def read(files):
        parts = [read_batch(os.path.join(folder, f), spec.label_key, num_classes) for f in files]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return Cifar(*read(spec.train), *read(spec.test))


def _read_num_classes(path, names_key):
    """The number of class names in the meta file: the bound every label is checked against."""
    meta = read_pickle(path)
    if not isinstance(meta, dict) or not isinstance(meta.get(names_key), list):
        raise ValueError(f"{path}: expected a dict with {names_key!r}")
    return len(meta[names_key])


# --- serving batches on the device ---

def crop_flip(images, shifts, flips):
    """Random crop 32 from the zero-padded 40x40 image, then horizontal flip, for a whole
    batch at once: one gather whose row and column indices carry each image's shift and flip.

    images: uint8 (B, 3, 32, 32); shifts: (B, 2) in [0, 8] (rows, cols); flips: bool (B,).
    """
    B, device = len(images), images.device
    padded = F.pad(images, (4, 4, 4, 4))  # zeros, as RandomCrop(32, padding=4) pads raw pixels
    j = torch.arange(32, device=device)
    rows = shifts[:, 0, None] + j
    cols = shifts[:, 1, None] + torch.where(flips[:, None], 31 - j, j)
    return padded[torch.arange(B, device=device)[:, None, None, None],
                  torch.arange(3, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class CifarLoader:
    """Batches of normalised float32 images and labels from a data set kept on `device`.

    Training loaders shuffle and augment. Each epoch the permutation and every image's crop
    and flip come from one CPU generator seeded with `seed`, identical on every rank, so the
    run does not depend on the number of processes; rank r takes the r-th of `world_size`
    equal shards (the last few images of the permutation are dropped to make them equal,
    so every rank runs the same number of steps). Between epochs that generator is all the
    loader's state: get_state() and set_state() carry it through a checkpoint.
    """

    def __init__(self, images, labels, batch_size, device, *, train, seed=0, rank=0,
                 world_size=1, channels_last=False):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.rank, self.world_size = rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def get_state(self):
        """Where the loader's random stream stands (a uint8 tensor, as torch.Generator's):
        the next epoch's order, crops and flips follow from it."""
        return self._generator.get_state()

    def set_state(self, state):
        """Continue from get_state()'s state: the next epoch is the one it was saved before."""
        self._generator.set_state(state)

    def shard_size(self):
        n = len(self.images)
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self):
        return -(-self.shard_size() // self.batch_size)

    def __iter__(self):
        n = len(self.images)
        if self.train:
            order = torch.randperm(n, generator=self._generator)
            shifts = torch.randint(0, 9, (n, 2), generator=self._generator).to(self.device)
            flips = torch.randint(0, 2, (n,), generator=self._generator).bool().to(self.device)
            order = order[:n - n % self.world_size]
        else:
            order = torch.arange(n)
        order = order[self.rank::self.world_size].to(self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx]
            if self.train:
                x = crop_flip(x, shifts[idx], flips[idx])
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            yield x, self.labels[idx]
