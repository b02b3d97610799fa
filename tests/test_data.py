"""Loaders of the real file formats, the long-tailed profile and the class splits."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from imbsam.train.data import long_tail_counts, shot_split
from imbsam.train.data.device_loader import DeviceLoader, random_crop_flip
from imbsam.train.data.formats import read_cifar_batch, read_idx, write_idx
from imbsam.train.data.sources import load_cifar_lt, load_dataset, load_fmnist_lt

from synthetic_data import write_cifar, write_fmnist


def test_cifar100_lt_counts_if100():
    counts = long_tail_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5 and sum(counts) == 10847
    assert counts == sorted(counts, reverse=True)


def test_shot_split_thresholds():
    groups = shot_split(long_tail_counts(500, 100, 100))
    counts = long_tail_counts(500, 100, 100)
    assert all((g == "many") == (c > 100) and (g == "few") == (c < 20) for g, c in zip(groups, counts))
    assert shot_split(long_tail_counts(6000, 10, 100)).count("many") == 4
    assert shot_split(long_tail_counts(6000, 10, 100)).count("few") == 3


def test_idx_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(str(tmp_path / "x.gz"), a)
    assert np.array_equal(read_idx(str(tmp_path / "x.gz")), a)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(str(tmp_path / "bad"))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_lt_keeps_the_first_n_of_each_class(tmp_path, num_classes):
    write_cifar(str(tmp_path), num_classes, per_class=20, test_per_class=3)
    data = load_cifar_lt(f"cifar{num_classes}", str(tmp_path), imb_factor=10, download=False, verify=False)
    assert data.counts == long_tail_counts(20, num_classes, 10)
    assert np.bincount(data.train_y.numpy(), minlength=num_classes).tolist() == data.counts
    assert data.train_x.shape[1:] == (3, 32, 32) and data.train_x.dtype == torch.uint8
    assert len(data.test_y) == 3 * num_classes
    # The kept images are the first n_c of their class in file order.
    folder = os.path.join(str(tmp_path), "cifar-100-python" if num_classes == 100 else "cifar-10-batches-py")
    files = ["train"] if num_classes == 100 else [f"data_batch_{i}" for i in range(1, 6)]
    parts = [read_cifar_batch(os.path.join(folder, f), "fine_labels" if num_classes == 100 else "labels")
             for f in files]
    all_x, all_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    c = num_classes - 1
    expected = all_x[all_y == c][:data.counts[c]]
    assert np.array_equal(data.train_x[data.train_y == c].numpy(), expected)


def test_cifar_checksums_are_checked(tmp_path):
    write_cifar(str(tmp_path), 10, per_class=5, test_per_class=1)
    with pytest.raises(ValueError, match="md5.*--skip-checksum"):
        load_cifar_lt("cifar10", str(tmp_path), 10, download=False, verify=True)


def test_missing_cifar_offline_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz.*md5.*--data-root"):
        load_dataset("cifar100-lt", str(tmp_path), 100, download=False)


def test_fmnist_lt_from_idx_files(tmp_path):
    folder = write_fmnist(str(tmp_path / "fm"), per_class=30, test_per_class=2)
    data = load_fmnist_lt(folder, imb_factor=10, download=False)
    assert data.counts == long_tail_counts(30, 10, 10)
    assert data.train_x.shape[1:] == (1, 28, 28) and len(data.test_y) == 20
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fmnist_lt(str(tmp_path / "nothing"), 10, download=False)


def test_augmentation_is_a_shifted_flipped_window():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).view(4, 3, 8, 8).to(torch.uint8)
    out = random_crop_flip(x, 2, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):  # each output is some window of the padded image, maybe mirrored
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_device_loader_epochs_replay_from_the_generator_state():
    x = torch.randint(0, 255, (50, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(50) % 5
    gen = torch.Generator().manual_seed(1)
    loader = DeviceLoader(x, y, 16, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), train=True, generator=gen)
    assert len(loader) == 4
    state = gen.get_state()
    first = [(a.clone(), b.clone()) for a, b in loader]
    gen.set_state(state)
    again = list(loader)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, again))
    assert sorted(torch.cat([b for _, b in first]).tolist()) == sorted(y.tolist())  # a permutation
    loader.drop_last = True
    assert len(list(loader)) == 3
