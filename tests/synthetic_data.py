"""Small synthetic datasets written in the real file formats (CIFAR pickles, IDX gz)."""
from __future__ import annotations

import os
import pickle

import numpy as np

from imbsam.train.data.formats import write_idx


def write_cifar(root: str, num_classes: int, per_class: int, test_per_class: int, seed: int = 0) -> str:
    """A cifar-10-batches-py/ or cifar-100-python/ folder under root; returns root.

    Images carry their class in the mean brightness, so a model can learn them.
    """
    rng = np.random.default_rng(seed)

    def batch(n_per_class):
        labels = rng.permutation(np.repeat(np.arange(num_classes), n_per_class))
        base = (labels * (200 // num_classes))[:, None].astype(np.int64)
        data = np.clip(base + rng.integers(0, 55, (len(labels), 3 * 32 * 32)), 0, 255).astype(np.uint8)
        return data, labels.tolist()

    if num_classes == 100:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for name, n in (("train", per_class), ("test", test_per_class)):
            data, labels = batch(n)
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": labels}, f)
    else:
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        data, labels = batch(per_class)
        parts = np.array_split(np.arange(len(labels)), 5)
        for i, part in enumerate(parts, 1):
            with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
                pickle.dump({"data": data[part], "labels": [labels[j] for j in part]}, f)
        data, labels = batch(test_per_class)
        with open(os.path.join(folder, "test_batch"), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    return root


def write_fmnist(folder: str, per_class: int, test_per_class: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", per_class), ("t10k", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28)).astype(np.uint8)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return folder
