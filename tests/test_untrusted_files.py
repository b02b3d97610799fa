"""Nothing the package reads from disk can run code, and a damaged file gets a clear
error that names it, never a raw traceback, and is never overwritten: the trainer's
checkpoints (loaded with weights_only=True) and CIFAR's pickled batches (a restricted
unpickler, also past a failed checksum)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from imbsam.train import main
from imbsam.train.data.formats import read_cifar_batch

from synthetic_data import write_cifar


class Payload:
    """Unpickled without restrictions, it creates the file ``marker``: proof that code ran;
    by ``open`` (a global torch does not allow) or by ``os.system`` (from a module it blocks)."""

    def __init__(self, marker, how="open"):
        self.marker, self.how = marker, how

    def __reduce__(self):
        return (open, (self.marker, "w")) if self.how == "open" else (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp("cifar")), 10, per_class=24, test_per_class=4)


def resume(root, out):
    return main(["--dataset", "cifar10-lt", "--data-root", root, "--imb-factor", "10", "--no-download",
                 "--skip-checksum", "--model", "resnet32", "--batch-size", "16", "--epochs", "2", "--device", "cpu",
                 "--out", out, "--no-progress", "--opt", "sgd", "--resume"])


def plant(out, content: bytes) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "checkpoint.pt")
    with open(path, "wb") as f:
        f.write(content)
    return path


@pytest.mark.parametrize("how", ["open", "os.system"])
def test_a_crafted_checkpoint_runs_no_code(cifar_root, tmp_path, how):
    """The os.system payload was refused as "not a readable checkpoint ... cut short" (torch
    words a blocked module's global differently), which did not say why."""
    marker = str(tmp_path / "code-ran")
    path = str(tmp_path / "crafted.pt")
    torch.save({"epoch": 1, "args": Payload(marker, how)}, path)
    with open(path, "rb") as f:
        crafted = f.read()
    planted = plant(str(tmp_path / "run"), crafted)
    with pytest.raises(SystemExit, match=r"holds more than tensors and plain data.*could run code"):
        resume(cifar_root, str(tmp_path / "run"))
    assert not os.path.exists(marker)
    with open(planted, "rb") as f:
        assert f.read() == crafted  # left as it was


RANDOM = [np.random.default_rng(seed).bytes(4096) for seed in range(8)]  # fixed: the same bytes every run


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", *RANDOM],
                         ids=["empty", "truncated", *(f"random{seed}" for seed in range(8))])
def test_a_damaged_checkpoint_is_named_and_left_alone(cifar_root, tmp_path, content):
    planted = plant(str(tmp_path / "run"), content)
    with pytest.raises(SystemExit, match=f"--resume: {planted} is not a readable checkpoint"):
        resume(cifar_root, str(tmp_path / "run"))
    with open(planted, "rb") as f:
        assert f.read() == content


def test_a_checkpoint_of_something_else_is_refused(cifar_root, tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    torch.save({"epoch": 3, "model": {}}, os.path.join(out, "checkpoint.pt"))
    with pytest.raises(SystemExit, match="not a checkpoint of this trainer .missing: optimizer, scheduler"):
        resume(cifar_root, out)


def test_a_crafted_cifar_batch_runs_no_code(tmp_path):
    marker = str(tmp_path / "code-ran")
    path = str(tmp_path / "data_batch_1")
    with open(path, "wb") as f:
        pickle.dump({"data": Payload(marker), "labels": [0]}, f)
    with pytest.raises(ValueError, match=r"not a CIFAR python batch.*refusing to load [\w.]*open"):
        read_cifar_batch(path, "labels")
    assert not os.path.exists(marker)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_in_the_real_format_still_load(tmp_path, protocol):
    # CIFAR's own files are protocol-2 pickles of a dict with a uint8 array and lists.
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path = str(tmp_path / "batch")
    with open(path, "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": data, "labels": [3, 7],
                     "filenames": [b"a.png", b"b.png"]}, f, protocol=protocol)
    images, labels = read_cifar_batch(path, "labels")
    assert images.shape == (2, 3, 32, 32) and np.array_equal(images.reshape(2, -1), data)
    assert labels.tolist() == [3, 7]


def test_a_cifar_batch_that_is_not_a_pickle_is_named(tmp_path):
    path = str(tmp_path / "test_batch")
    with open(path, "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(ValueError, match=f"{path}: not a CIFAR python batch"):
        read_cifar_batch(path, "labels")
