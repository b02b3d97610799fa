"""The long-tailed datasets: CIFAR-10/100-LT and Fashion-MNIST-LT, as uint8 tensors.

Training sets keep the first ``n_c`` images of each class (``n_c`` from
``long_tail_counts``): the same images as the paper's (LDAM-DRW's) code. They stay in the
file's order, where that code groups them by class, so one seed shuffles the same images
into other batches than the paper's loop would. Test sets are left whole.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from imbsam.train.data.formats import read_cifar_batch, read_idx
from imbsam.train.data.profile import long_tail_counts

FMNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")

# Archives and per-file md5 sums as torchvision publishes them.
CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", label_key="labels", num_classes=10,
                    train=[("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                           ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                           ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                           ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                           ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")],
                    test=[("test_batch", "40351d587109b95175f43aff81a1287e")]),
    "cifar100": dict(folder="cifar-100-python", url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", label_key="fine_labels", num_classes=100,
                     train=[("train", "16019d7e3df5f24257cddd939b257f8d")],
                     test=[("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")]),
}
# Normalisation: the paper's CIFAR constants; Fashion-MNIST's own training statistics.
MEAN_STD = {"cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)), "fmnist": ((0.2860,), (0.3530,))}


@dataclass
class LongTailData:
    name: str
    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    counts: list[int]  # training images per class
    mean: tuple = field(default=())
    std: tuple = field(default=())

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]


def first_n_per_class(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """Indices of the first ``counts[c]`` samples of each class ``c``, in file order."""
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise ValueError(f"class {c} has {len(idx)} training samples, fewer than the {n} the profile asks for")
        keep.append(idx[:n])
    return np.sort(np.concatenate(keep))


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cifar_folder(name: str, data_root: str, download: bool, verify: bool) -> str:
    spec = CIFAR[name]
    folder = os.path.join(data_root, spec["folder"])
    if not os.path.isdir(folder):
        if not download:
            raise FileNotFoundError(_no_copy_message(name, data_root))
        try:
            from torchvision.datasets.utils import download_and_extract_archive
            download_and_extract_archive(spec["url"], data_root, md5=spec["md5"])  # checks the archive's md5
        except Exception as exc:
            raise FileNotFoundError(_no_copy_message(name, data_root) + f"\n(download failed: {exc})") from exc
    for fname, md5 in spec["train"] + spec["test"]:
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {folder} is not a complete copy of {spec['url']}")
        if verify and _md5(path) != md5:
            raise ValueError(f"{path}: md5 {_md5(path)} is not the published {md5}; a damaged or different "
                             "copy (pass --skip-checksum to use it anyway)")
    return folder


def _no_copy_message(name: str, data_root: str) -> str:
    spec = CIFAR[name]
    return (f"no {name} copy at {os.path.join(data_root, spec['folder'])} and no download allowed or possible. "
            f"Download {spec['url']} (md5 {spec['md5']}), extract it into {data_root} (giving "
            f"{spec['folder']}/), or point --data-root at a folder that holds {spec['folder']}/")


def read_cifar(name: str, data_root: str, download: bool = True,
               verify: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole of CIFAR-10 or CIFAR-100 (``name`` is ``cifar10`` or ``cifar100``):
    training images and labels, test images and labels, in the files' order."""
    spec = CIFAR[name]
    folder = _cifar_folder(name, data_root, download, verify)
    parts = [read_cifar_batch(os.path.join(folder, f), spec["label_key"]) for f, _ in spec["train"]]
    test_x, test_y = read_cifar_batch(os.path.join(folder, spec["test"][0][0]), spec["label_key"])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test_x, test_y


def load_cifar_lt(name: str, data_root: str, imb_factor: float, download: bool = True,
                  verify: bool = True) -> LongTailData:
    """CIFAR-10-LT or CIFAR-100-LT (``name`` is ``cifar10`` or ``cifar100``)."""
    spec = CIFAR[name]
    train_x, train_y, test_x, test_y = read_cifar(name, data_root, download, verify)
    n_max = int(np.bincount(train_y, minlength=spec["num_classes"]).max())
    counts = long_tail_counts(n_max, spec["num_classes"], imb_factor)
    keep = first_n_per_class(train_y, counts)
    mean, std = MEAN_STD["cifar"]
    return LongTailData(f"{name}-lt", torch.from_numpy(train_x[keep].copy()), torch.from_numpy(train_y[keep]),
                        torch.from_numpy(test_x), torch.from_numpy(test_y), counts, mean, std)


def _fmnist_folder(data_root: str | None, download: bool) -> str:
    candidates = [data_root] if data_root else [FMNIST_DEFAULT_ROOT, os.path.join("data", "fashion-mnist")]
    for folder in candidates:
        for sub in ("", os.path.join("FashionMNIST", "raw")):
            if all(os.path.isfile(os.path.join(folder, sub, f)) for f in FMNIST_FILES):
                return os.path.join(folder, sub)
    if download:
        target = data_root or os.path.join("data", "fashion-mnist")
        try:
            from torchvision.datasets import FashionMNIST
            FashionMNIST(target, train=True, download=True)
            return os.path.join(target, "FashionMNIST", "raw")
        except Exception as exc:
            raise FileNotFoundError(_fmnist_message(candidates) + f"\n(download failed: {exc})") from exc
    raise FileNotFoundError(_fmnist_message(candidates))


def _fmnist_message(candidates) -> str:
    return (f"no Fashion-MNIST IDX files ({', '.join(FMNIST_FILES)}) in {', '.join(map(str, candidates))}. "
            "On Debian/Ubuntu: apt-get install dataset-fashion-mnist (files in "
            f"{FMNIST_DEFAULT_ROOT}); or pass --data-root pointing at a folder with the four .gz files")


def read_fmnist(data_root: str | None, download: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole of Fashion-MNIST from its IDX files (Debian's package by default; torchvision's
    download otherwise): training images (N, 1, 28, 28) and int64 labels, test images and labels."""
    folder = _fmnist_folder(data_root, download)
    train_x, train_y, test_x, test_y = (read_idx(os.path.join(folder, f)) for f in FMNIST_FILES)
    return train_x[:, None], train_y.astype(np.int64), test_x[:, None], test_y.astype(np.int64)


def load_fmnist_lt(data_root: str | None, imb_factor: float, download: bool = True) -> LongTailData:
    """Fashion-MNIST-LT: the first images of each class, as many as the long-tailed profile says."""
    train_x, train_y, test_x, test_y = read_fmnist(data_root, download)
    n_max = int(np.bincount(train_y, minlength=10).max())
    counts = long_tail_counts(n_max, 10, imb_factor)
    keep = first_n_per_class(train_y, counts)
    mean, std = MEAN_STD["fmnist"]
    return LongTailData("fmnist-lt", torch.from_numpy(train_x[keep].copy()), torch.from_numpy(train_y[keep]),
                        torch.from_numpy(test_x.copy()), torch.from_numpy(test_y), counts, mean, std)


DATASETS = ("cifar100-lt", "cifar10-lt", "fmnist-lt")


def load_dataset(name: str, data_root: str | None, imb_factor: float, download: bool = True,
                 verify: bool = True) -> LongTailData:
    if name == "fmnist-lt":
        return load_fmnist_lt(data_root, imb_factor, download)
    if name in ("cifar100-lt", "cifar10-lt"):
        return load_cifar_lt(name[:-3], data_root or "data", imb_factor, download, verify)
    raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
