"""Deep SAD's semi-supervised anomaly-detection setting on a classification dataset.

One class is normal, the other nine anomalous. The training set holds every training
image of the normal class (unlabelled), unlabelled anomalies from all anomaly classes
(the pollution: a share ``gamma_p`` of the unlabelled data) and labelled anomalies
from the known anomaly class (a share ``gamma_l`` of the whole training set). The test
set is left whole: its normal class against all the others. Images are scaled to
[0, 1] and nothing else, as the authors' code does.

The counts follow from the two ratios (Ruff et al., 2020; the authors' code solves the
same equations as a linear system, with a share of labelled normals that their
experiments leave at 0): with ``n`` normal images, ``u = gamma_p / (1 - gamma_p) * n``
unlabelled anomalies and ``gamma_l / (1 - gamma_l) * (n + u)`` labelled ones, each
rounded down. Unlike the authors' code, a labelled anomaly is never also drawn as an
unlabelled one (they draw the two from independent permutations).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imbsam.train.data.sources import read_cifar, read_fmnist

# Semi-supervised labels, as Deep SAD writes them: its loss raises (distance + eps) to this power.
LABELLED_NORMAL, UNLABELLED, LABELLED_ANOMALY = 1, 0, -1
DATASETS = ("fmnist", "cifar10")
NUM_CLASSES = 10  # both datasets


@dataclass
class AnomalySetting:
    name: str
    train_x: torch.Tensor  # (N, C, H, W) uint8
    semi: torch.Tensor  # (N,) int64: UNLABELLED or LABELLED_ANOMALY
    train_anomalous: torch.Tensor  # (N,) bool: the truth, labelled or not (for reports only)
    test_x: torch.Tensor
    test_y: torch.Tensor  # (M,) int64: the original classes
    normal_class: int
    known_anomaly_class: int

    @property
    def test_anomalous(self) -> torch.Tensor:
        return self.test_y != self.normal_class

    def counts(self) -> dict:
        labelled = int((self.semi == LABELLED_ANOMALY).sum())
        anomalous = int(self.train_anomalous.sum())
        return dict(normal=len(self.semi) - anomalous, unlabelled_anomalies=anomalous - labelled,
                    labelled_anomalies=labelled)


def setting_counts(n_normal: int, gamma_l: float, gamma_p: float) -> tuple[int, int]:
    """(unlabelled anomalies, labelled anomalies) for ``n_normal`` normal training images."""
    unlabelled = gamma_p / (1 - gamma_p) * n_normal
    labelled = gamma_l / (1 - gamma_l) * (n_normal + unlabelled)
    return int(unlabelled), int(labelled)


def semi_supervised_split(labels: np.ndarray, normal_class: int, known_anomaly_class: int, gamma_l: float,
                          gamma_p: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training indices and their semi-supervised labels (sorted by index)."""
    normal = np.flatnonzero(labels == normal_class)
    n_unlabelled, n_labelled = setting_counts(len(normal), gamma_l, gamma_p)
    candidates = np.flatnonzero(labels == known_anomaly_class)
    if n_labelled > len(candidates):
        raise ValueError(f"gamma_l={gamma_l:g} asks for {n_labelled} labelled anomalies of class "
                         f"{known_anomaly_class}, which has {len(candidates)} training images")
    labelled = rng.permutation(candidates)[:n_labelled]
    pool = np.setdiff1d(np.flatnonzero(labels != normal_class), labelled)
    if n_unlabelled > len(pool):
        raise ValueError(f"gamma_p={gamma_p:g} asks for {n_unlabelled} unlabelled anomalies; {len(pool)} are left")
    unlabelled = rng.permutation(pool)[:n_unlabelled]
    index = np.concatenate([normal, unlabelled, labelled])
    semi = np.concatenate([np.full(len(normal) + len(unlabelled), UNLABELLED),
                           np.full(len(labelled), LABELLED_ANOMALY)])
    order = np.argsort(index, kind="stable")
    return index[order], semi[order].astype(np.int64)


def load_setting(dataset: str, data_root: str | None, normal_class: int, known_anomaly_class: int, gamma_l: float,
                 gamma_p: float, seed: int, download: bool = True, verify: bool = True) -> AnomalySetting:
    """The setting's training and test sets; ``seed`` draws which anomalies it holds."""
    if dataset == "fmnist":
        train_x, train_y, test_x, test_y = read_fmnist(data_root, download)
    elif dataset == "cifar10":
        train_x, train_y, test_x, test_y = read_cifar("cifar10", data_root or "data", download, verify)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    index, semi = semi_supervised_split(train_y, normal_class, known_anomaly_class, gamma_l, gamma_p,
                                        np.random.default_rng(seed))
    return AnomalySetting(dataset, torch.from_numpy(np.ascontiguousarray(train_x[index])), torch.from_numpy(semi),
                          torch.from_numpy(train_y[index] != normal_class), torch.from_numpy(test_x.copy()),
                          torch.from_numpy(test_y), normal_class, known_anomaly_class)
