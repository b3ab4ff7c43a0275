#!/usr/bin/env python
"""Write scikit-learn's handwritten digits as a CIFAR-10 data set in the official layout:
a small real data set that the trainer (and reproduce) read as they read CIFAR-10.

    pip install scikit-learn      # this script's own dependency (nothing else needs it)
    python scripts/digits_cifar.py DATA_DIR [--test-fraction 0.25] [--seed 0]
    python -m spem_kernels.reproduce --data-dir DATA_DIR --datasets cifar10 ...

The 1797 digits (8x8 pixels, 17 grey levels, 10 classes; UCI "optdigits", shipped inside
scikit-learn) are scaled to 0-255, enlarged 4x to 32x32 (each pixel a 4x4 block) and
repeated over the three colour channels; a stratified split gives the test set. Written to
DATA_DIR/cifar-10-batches-py/: data_batch_1..5 (the training set in five parts),
test_batch and batches.meta, each a pickled dict as the official files hold (b"data": uint8
(n, 3072), b"labels": a list of ints; protocol 4, whose bytes and arrays the trainer's
restricted unpickler reads).
"""
import argparse
import os
import pickle

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = 5


def to_cifar_rows(images):
    """(n, 8, 8) values 0..16 -> (n, 3072) uint8: 32x32, three equal channels, CIFAR's
    row layout (all red, then green, then blue)."""
    big = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2) * (255.0 / 16.0)
    rgb = np.repeat(big[:, None], 3, axis=1)
    return np.round(rgb).astype(np.uint8).reshape(len(images), 3 * 32 * 32)


def write(path, batch):
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=args.test_fraction, random_state=args.seed,
        stratify=digits.target)
    folder = os.path.join(args.data_dir, FOLDER)
    os.makedirs(folder, exist_ok=True)
    parts = np.array_split(np.arange(len(train_x)), TRAIN_FILES)
    for i, part in enumerate(parts, 1):
        write(os.path.join(folder, f"data_batch_{i}"),
              {b"batch_label": f"digits training batch {i} of {TRAIN_FILES}".encode(),
               b"data": to_cifar_rows(train_x[part]),
               b"labels": [int(v) for v in train_y[part]]})
    write(os.path.join(folder, "test_batch"),
          {b"batch_label": b"digits testing batch", b"data": to_cifar_rows(test_x),
           b"labels": [int(v) for v in test_y]})
    write(os.path.join(folder, "batches.meta"),
          {b"label_names": [str(d).encode() for d in range(10)],
           b"num_cases_per_batch": len(parts[0]), b"num_vis": 3072})
    print(f"wrote {folder}: {len(train_x)} training and {len(test_x)} test images of 10 digits")


if __name__ == "__main__":
    main()
