"""The trainer data-parallel: two gloo ranks on 127.0.0.1 (launched as torchrun would, by
RANK / WORLD_SIZE / LOCAL_RANK) train as one process does on the same global batches,
only rank 0 writes, and a run split into two sessions resumes across the group.

A model without BatchNorm: each rank normalises its share of a batch by its own
statistics, which one process on the whole batch does not; ``--sync-bn`` would make them
agree, but torch's SyncBatchNorm runs on GPUs only (here: its refusal and the conversion).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from imbsam.train import main

from ranks import needs_gloo, run_ranks
from synthetic_data import write_cifar

run_module = sys.modules["imbsam.train.run"]  # the package exports a function of the same name


def no_bn_cnn(name: str, num_classes: int, channels: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, num_classes))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    # 95 training images: batches of 16, each split 8 + 8, and a last one of 15, split 8 + 7
    # (the shares' losses weighted so that their averaged gradient is the batch's mean).
    return write_cifar(str(tmp_path_factory.mktemp("cifar")), 10, per_class=24, test_per_class=4)


def argv(root, out, opt, *extra):
    return ["--dataset", "cifar10-lt", "--data-root", root, "--imb-factor", "10", "--no-download",
            "--skip-checksum", "--model", "resnet32", "--batch-size", "16", "--epochs", "2", "--device", "cpu",
            "--out", out, "--no-progress", "--opt", opt, "--eta", "10", *extra]  # eta: 6 of 10 classes are tail


def _rank(rank: int, world: int, path: str, root: str, out: str, opt: str, extra: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    run_module.build_model = no_bn_cnn
    metrics = main(argv(root, out, opt, *extra))
    with open(path, "w") as f:
        json.dump(metrics, f)


def one_process(root, out, opt, *extra):
    real = run_module.build_model
    run_module.build_model = no_bn_cnn
    try:
        return main(argv(root, out, opt, *extra))
    finally:
        run_module.build_model = real


def weights(out: str) -> dict:
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]


@needs_gloo
@pytest.mark.parametrize("opt", ["sgd", "sam", "imbsam"])
def test_two_ranks_train_as_one_process(cifar_root, tmp_path, opt):
    out = str(tmp_path / "ranks")
    paths = run_ranks(_rank, (cifar_root, out, opt, ()), str(tmp_path / "returned"))
    by_rank = []
    for path in paths:
        with open(path) as f:
            by_rank.append(json.load(f))
    alone = one_process(cifar_root, str(tmp_path / "alone"), opt)
    got, want = weights(out), weights(str(tmp_path / "alone"))
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-5), (key, (got[key] - want[key]).abs().max())
    assert by_rank[0]["world_size"] == 2 and by_rank[0]["all"] == by_rank[1]["all"]
    assert abs(by_rank[0]["all"] - alone["all"]) < 1e-3
    with open(os.path.join(out, "train.log")) as f:
        log = f.read()
    assert log.count("epoch   1/2") == 1 and "over 2 ranks" in log  # rank 0 alone wrote it


@needs_gloo
def test_a_run_split_into_sessions_resumes_across_the_group(cifar_root, tmp_path):
    out = str(tmp_path / "ranks")
    run_ranks(_rank, (cifar_root, out, "imbsam", ("--max-epochs-this-run", "1")), str(tmp_path / "first"))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    run_ranks(_rank, (cifar_root, out, "imbsam", ("--resume",)), str(tmp_path / "second"))
    one_process(cifar_root, str(tmp_path / "alone"), "imbsam")
    got, want = weights(out), weights(str(tmp_path / "alone"))
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-5), key


def test_a_global_batch_the_ranks_cannot_share_evenly_is_refused(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="--batch-size 16 is the global batch: it must be a multiple of the 3"):
        main(argv(cifar_root, str(tmp_path / "out"), "sgd"))


@needs_gloo
def test_torchrun_launches_the_trainer(cifar_root, tmp_path):
    """The command a user runs: torchrun on one machine, two processes, 127.0.0.1 only."""
    from ranks import free_port

    out = str(tmp_path / "torchrun")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "imbsam.train",
               *argv(cifar_root, out, "imbsam", "--epochs", "1")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["world_size"] == 2


def test_sync_bn_on_the_cpu_is_refused_before_the_group_is_joined(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--sync-bn: torch's SyncBatchNorm runs on CUDA devices only, and this run "
                                         "is on cpu"):
        main(argv(cifar_root, str(out), "sgd", "--sync-bn"))
    assert not out.exists() and not torch.distributed.is_initialized()


def test_sync_bn_turns_batch_norm_into_sync_batch_norm_over_several_ranks_only():
    from imbsam.train.distributed import Ranks
    from imbsam.train.models import build_model

    def model():
        torch.manual_seed(0)
        return build_model("resnet32", 10, 3)

    plain = model()
    params, keys = list(plain.parameters()), plain.state_dict().keys()
    converted = run_module.normalised_over_ranks(plain, True, Ranks(rank=0, world=2))
    kinds = {type(m) for m in converted.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    # An optimizer built on the parameters before or after holds the same tensors.
    assert all(a is b for a, b in zip(converted.parameters(), params)) and len(list(converted.parameters())) == len(
        params)
    assert converted.state_dict().keys() == keys
    for sync_bn, ranks in ((True, Ranks()), (False, Ranks(rank=0, world=2))):
        kept = model()
        assert run_module.normalised_over_ranks(kept, sync_bn, ranks) is kept
        assert torch.nn.SyncBatchNorm not in {type(m) for m in kept.modules()}


def test_compile_under_several_ranks_is_refused_before_the_group_is_joined(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--compile aot_eager: not together with 2 ranks"):
        main(argv(cifar_root, str(out), "sam", "--compile", "aot_eager"))
    assert not out.exists() and not torch.distributed.is_initialized()
