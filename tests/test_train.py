"""The training CLI end to end on the CPU, on synthetic CIFAR files in the real format."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from imbsam.train import main

from synthetic_data import write_cifar


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp("cifar")), 10, per_class=24, test_per_class=4)


def args(root, out, *extra):
    return ["--dataset", "cifar10-lt", "--data-root", root, "--imb-factor", "10", "--no-download",
            "--skip-checksum", "--model", "resnet32", "--batch-size", "16", "--epochs", "2", "--device", "cpu",
            "--out", out, "--no-progress", *extra]


@pytest.mark.parametrize("opt", ["sgd", "sam", "imbsam"])
def test_end_to_end_writes_metrics_and_plots(cifar_root, tmp_path, opt):
    out = str(tmp_path / opt)
    metrics = main(args(cifar_root, out, "--opt", opt))
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    for key in ("many", "medium", "few", "all", "opt", "dataset", "epochs", "wall_s", "device"):
        assert key in saved, key
    assert saved["opt"] == opt and saved["dataset"] == "cifar10-lt" and saved["epochs"] == 2
    assert 0 <= saved["all"] <= 100 and saved == json.loads(json.dumps(metrics))
    assert saved["best_epoch_selected_on_test"]["epoch"] in (1, 2)
    for png in ("per_class_accuracy.png", "training_curves.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(out, "checkpoint.pt"))


def test_resume_continues_identically(cifar_root, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main(args(cifar_root, straight, "--opt", "imbsam"))
    assert main(args(cifar_root, split, "--opt", "imbsam", "--max-epochs-this-run", "1")) is None
    first = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=False)
    assert first["epoch"] == 1
    main(args(cifar_root, split, "--opt", "imbsam", "--resume"))
    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma = json.load(open(os.path.join(straight, "metrics.json")))
    mb = json.load(open(os.path.join(split, "metrics.json")))
    assert ma["per_class"] == mb["per_class"]


def test_refuses_to_overwrite_a_checkpoint(cifar_root, tmp_path):
    out = str(tmp_path / "run")
    main(args(cifar_root, out, "--opt", "sgd", "--epochs", "1"))
    with pytest.raises(SystemExit, match="--resume"):
        main(args(cifar_root, out, "--opt", "sgd", "--epochs", "1"))


def test_resume_rejects_changed_options(cifar_root, tmp_path):
    out = str(tmp_path / "run")
    main(args(cifar_root, out, "--opt", "sgd", "--max-epochs-this-run", "1"))
    with pytest.raises(SystemExit, match="rho"):
        main(args(cifar_root, out, "--opt", "sgd", "--rho", "0.1", "--resume"))


@pytest.mark.parametrize("order", ["paper", "torch"])
def test_the_cosine_schedule_runs_each_epoch_at_the_lr_of_its_order(cifar_root, tmp_path, order):
    out = str(tmp_path / order)
    main(args(cifar_root, out, "--opt", "sgd", "--epochs", "4", "--eval-every", "4", "--lr", "0.1",
              "--lr-schedule", order))
    with open(os.path.join(out, "history.json")) as f:
        lrs = [r["lr"] for r in json.load(f)]
    cosine = [0.1 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]  # lr(0) .. lr(4)
    # The paper's loop steps the scheduler before each epoch: lr(1) .. lr(4), the last at 0.
    expected = cosine[1:] if order == "paper" else cosine[:-1]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_a_checkpoint_from_before_the_schedule_option_resumes_in_torch_order(cifar_root, tmp_path):
    out = str(tmp_path / "run")
    main(args(cifar_root, out, "--opt", "sgd", "--lr-schedule", "torch", "--max-epochs-this-run", "1"))
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    del ck["args"]["lr_schedule"]  # what runs saved before the option recorded
    torch.save(ck, path)
    with pytest.raises(SystemExit, match="lr_schedule='paper' \\(checkpoint: 'torch'\\)"):
        main(args(cifar_root, out, "--opt", "sgd", "--resume"))  # the default is the paper's order
    assert main(args(cifar_root, out, "--opt", "sgd", "--lr-schedule", "torch", "--resume"))["epochs"] == 2


def test_a_checkpoint_from_before_the_bn_option_resumes_updating_the_statistics(cifar_root, tmp_path):
    out = str(tmp_path / "run")
    main(args(cifar_root, out, "--opt", "sam", "--max-epochs-this-run", "1"))
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    del ck["args"]["perturbed_bn_stats"]  # what runs saved before the option recorded
    torch.save(ck, path)
    with pytest.raises(SystemExit, match="perturbed_bn_stats='keep' \\(checkpoint: 'update'\\)"):
        main(args(cifar_root, out, "--opt", "sam", "--perturbed-bn-stats", "keep", "--resume"))
    metrics = main(args(cifar_root, out, "--opt", "sam", "--resume"))
    assert metrics["epochs"] == 2 and metrics["args"]["perturbed_bn_stats"] == "update"


def test_runs_of_the_two_schedule_orders_are_two_recipes():
    from imbsam.train.seeds import recipe_of
    old = dict(opt="sgd", args=dict(seed=1, epochs=200))  # saved before the option: torch's order
    assert recipe_of(old)["lr_schedule"] == "torch"
    assert recipe_of(dict(opt="sgd", args=dict(seed=1, epochs=200, lr_schedule="paper")))["lr_schedule"] == "paper"


def test_time_limit_stops_with_a_checkpoint_and_resumes(cifar_root, tmp_path):
    """A limit shorter than any epoch: one epoch runs, its checkpoint is written although
    --checkpoint-every would skip it, and --resume finishes the run."""
    out = str(tmp_path / "run")
    assert main(args(cifar_root, out, "--opt", "sam", "--time-limit-s", "0.001", "--checkpoint-every", "5")) is None
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["epoch"] == 1
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    with open(os.path.join(out, "train.log")) as f:
        assert "--time-limit-s" in f.read()
    metrics = main(args(cifar_root, out, "--opt", "sam", "--resume", "--checkpoint-every", "5"))
    assert metrics["epochs"] == 2
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["epoch"] == 2  # the last is kept


def test_checkpoint_every_skips_epochs_in_between(cifar_root, tmp_path, monkeypatch):
    run_module = sys.modules["imbsam.train.run"]  # the package exports a function of the same name
    written = []
    real = run_module.save_checkpoint
    monkeypatch.setattr(run_module, "save_checkpoint", lambda path, ck: (written.append(ck["epoch"]), real(path, ck)))
    out = str(tmp_path / "run")
    main(args(cifar_root, out, "--opt", "sgd", "--epochs", "5", "--checkpoint-every", "2"))
    assert written == [2, 4, 5]  # every second epoch, and the last


@pytest.mark.parametrize("bad", [["--checkpoint-every", "0"], ["--time-limit-s", "-1"], ["--rho", "nan"],
                                 ["--lr", "-1"], ["--momentum", "inf"], ["--weight-decay", "-0.1"], ["--eta", "0"],
                                 ["--tail-weight", "nan"], ["--imb-factor", "0.5"], ["--max-epochs-this-run", "0"]])
def test_bad_numeric_options_are_refused_before_anything_is_loaded(cifar_root, tmp_path, bad, monkeypatch):
    run_module = sys.modules["imbsam.train.run"]  # the package exports a function of the same name

    def no_load(*a, **k):
        raise AssertionError("the data was loaded before the options were checked")

    monkeypatch.setattr(run_module, "load_dataset", no_load)
    with pytest.raises(SystemExit, match=f"{bad[0]} must be a finite number"):
        main(args(cifar_root, str(tmp_path / "run"), "--opt", "sam", *bad))
    assert not (tmp_path / "run").exists()  # nothing written either


def test_an_out_folder_with_another_runs_log_is_refused(cifar_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("another run's log\n")
    with pytest.raises(SystemExit, match="train.log exists but no checkpoint does"):
        main(args(cifar_root, str(out), "--opt", "sgd"))
    assert (out / "train.log").read_text() == "another run's log\n"


def test_missing_data_is_a_clean_exit_that_says_how_to_get_it(tmp_path):
    # A CLI user gets the loader's message, not a traceback.
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(SystemExit, match="--dataset cifar10-lt: no cifar10 copy .*cifar-10-python.tar.gz"):
        main(args(empty, str(tmp_path / "run"), "--opt", "sgd"))


def test_unusable_backend_fails_before_loading_data(tmp_path, monkeypatch):
    run_module = sys.modules["imbsam.train.run"]  # the package's `run` attribute is the function

    def must_not_load(*a, **k):
        raise AssertionError("the data were loaded before the backend was checked")

    monkeypatch.setattr(run_module, "load_dataset", must_not_load)
    # cuda tensors on a CPU-only machine, or cpp kernels asked for on a GPU's tensors: never usable here.
    backend = "cpp" if torch.cuda.is_available() else "cuda"
    with pytest.raises(SystemExit, match=f"--backend {backend}: backend '{backend}'"):
        main(args("unused", str(tmp_path / "run"), "--opt", "imbsam", "--backend", backend,
                  "--device", "cuda" if torch.cuda.is_available() else "cpu"))
    with pytest.raises(SystemExit):  # argparse: not a backend at all
        main(args("unused", str(tmp_path / "run"), "--backend", "fast"))


def test_table_of_finished_runs_and_their_comparison_plot(cifar_root, tmp_path, capsys):
    from imbsam.train import table

    runs = [str(tmp_path / opt) for opt in ("sgd", "imbsam")]
    for opt, out in zip(("sgd", "imbsam"), runs):
        main(args(cifar_root, out, "--opt", opt, "--epochs", "1"))
    capsys.readouterr()
    png = str(tmp_path / "comparison.png")
    table.main([*runs, "--plot", png])
    printed = capsys.readouterr().out
    assert "Many  Medium    Few    All" in printed
    assert "sgd seed 9826 (1 ep" in printed and "imbsam seed 9826 (1 ep" in printed
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="metrics.json is missing"):
        table.main([str(tmp_path / "never-ran")])


def test_a_checkpoint_from_before_the_sync_bn_option_resumes_without_it(cifar_root, tmp_path):
    out = str(tmp_path / "run")
    main(args(cifar_root, out, "--opt", "sgd", "--max-epochs-this-run", "1"))
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    del ck["args"]["sync_bn"]  # what runs saved before the option recorded
    torch.save(ck, path)
    with pytest.raises(SystemExit, match="sync_bn=True \\(checkpoint: False\\)"):
        main(args(cifar_root, out, "--opt", "sgd", "--sync-bn", "--resume"))
    metrics = main(args(cifar_root, out, "--opt", "sgd", "--resume"))
    assert metrics["epochs"] == 2 and metrics["args"]["sync_bn"] is False


@pytest.mark.parametrize("opt", ["sam", "imbsam"])
def test_a_compiled_model_trains_as_the_eager_one(cifar_root, tmp_path, opt):
    """--compile: the same weights and test accuracies as eager, the same checkpoint keys
    (the model is saved, not its compiled wrapper), the option recorded. aot_eager, which
    generates no code: inductor's own numerics are tests/test_compile.py's."""
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    # One epoch: its last, smaller batch recompiles the model with the batch size symbolic.
    main(args(cifar_root, eager, "--opt", opt, "--epochs", "1"))
    torch._dynamo.reset()
    main(args(cifar_root, compiled, "--opt", opt, "--epochs", "1", "--compile", "aot_eager"))
    a = torch.load(os.path.join(eager, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(compiled, "checkpoint.pt"), weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.allclose(a["model"][k].double(), b["model"][k].double(), atol=1e-5), k
    ma, mb = (json.load(open(os.path.join(out, "metrics.json"))) for out in (eager, compiled))
    assert ma["per_class"] == mb["per_class"]
    assert mb["args"]["compile"] == "aot_eager" and ma["args"]["compile"] is None


def test_compile_gives_imbsam_the_retain_graph_backend(monkeypatch):
    """ImbSAM's head backward runs with retain_graph=True, which plain inductor refuses;
    SAM and SGD get the backend as named."""
    from imbsam.train.run import compiled

    seen = []

    def compile_recorded(net, backend):
        seen.append(getattr(backend, "__name__", backend))
        return net

    monkeypatch.setattr(torch, "compile", compile_recorded)
    net = torch.nn.Linear(2, 2)
    for opt in ("imbsam", "sam", "sgd"):
        assert compiled(net, "inductor", opt) is net
    assert compiled(net, None, "imbsam") is net
    assert seen == ["compile_keeping_saved_tensors", "inductor", "inductor"]  # nothing compiled without a backend


def test_compile_with_cuda_graph_is_refused_before_anything_is_written(cifar_root, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--compile inductor: not together with --cuda-graph"):
        main(args(cifar_root, str(out), "--opt", "imbsam", "--compile", "--cuda-graph"))
    assert not out.exists()


@pytest.mark.parametrize("bad,says", [
    (["--momentum", "5"], r"--momentum must be in \[0, 1\)"),
    (["--weight-decay", "1e10"], r"--lr x --weight-decay must be < 1 .* = 1e\+08"),
    (["--lr", "1e6"], r"--lr x --weight-decay must be < 1"),
    (["--device", "meta"], "--device meta: allowed are auto, cpu, cuda and cuda:N"),
    (["--device", "gpu"], "--device gpu: allowed are auto, cpu, cuda and cuda:N")])
def test_options_outside_what_the_method_admits_are_refused_before_anything_is_loaded(cifar_root, tmp_path, bad,
                                                                                     says, monkeypatch):
    """Each used to train to a NaN or 1e31 loss and exit 0 (or, --device meta, a traceback)."""
    run_module = sys.modules["imbsam.train.run"]
    monkeypatch.setattr(run_module, "load_dataset", lambda *a, **k: pytest.fail("the data was loaded first"))
    with pytest.raises(SystemExit, match=says):
        main(args(cifar_root, str(tmp_path / "run"), "--opt", "sam", *bad))
    assert not (tmp_path / "run").exists()


def test_an_imbalance_that_leaves_a_class_without_images_is_refused(cifar_root, tmp_path):
    with pytest.raises(SystemExit, match=r"imb_factor must be at most 24 here .* got 1e\+09"):
        main(args(cifar_root, str(tmp_path / "run"), "--opt", "sgd", "--imb-factor", "1e9"))


def test_a_diverging_run_stops_with_an_error_and_writes_no_metrics(cifar_root, tmp_path):
    """--rho 1e300 used to train to a NaN loss, write metrics and exit 0."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"stopped in epoch 1: the training loss is nan, so training diverged.*"
                                         r"--allow-divergence"):
        main(args(cifar_root, str(out), "--opt", "imbsam", "--rho", "1e300", "--lr-schedule", "torch"))
    assert not (out / "metrics.json").exists() and not (out / "checkpoint.pt").exists()
    assert "the training loss is nan" in (out / "train.log").read_text()


@pytest.mark.parametrize("loss", [float("nan"), 1e31])
def test_divergence_keeps_the_last_sound_checkpoint_unless_allowed(cifar_root, tmp_path, monkeypatch, loss):
    run_module = sys.modules["imbsam.train.run"]
    real = run_module.train_epoch
    epochs = []

    def second_diverges(*a, **k):
        stats = real(*a, **k)
        epochs.append(1)
        return dict(stats, train_loss=loss) if len(epochs) == 2 else stats
    monkeypatch.setattr(run_module, "train_epoch", second_diverges)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="stopped in epoch 2: the training loss is"):
        main(args(cifar_root, out, "--opt", "sgd", "--epochs", "3"))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    epochs.clear()
    allowed = str(tmp_path / "allowed")
    assert main(args(cifar_root, allowed, "--opt", "sgd", "--epochs", "3", "--allow-divergence"))["epochs"] == 3


def test_without_matplotlib_a_run_and_the_table_warn_and_succeed(cifar_root, tmp_path, monkeypatch, capsys):
    """Without matplotlib the trainer trained every epoch and then exited 1 in the plot."""
    from imbsam.train import report, table

    def no_matplotlib():
        raise ImportError("No module named 'matplotlib'")
    monkeypatch.setattr(report, "_pyplot", no_matplotlib)
    out = tmp_path / "run"
    assert main(args(cifar_root, str(out), "--opt", "sgd", "--epochs", "1"))["epochs"] == 1
    assert (out / "metrics.json").exists() and not list(out.glob("*.png"))
    log = (out / "train.log").read_text()
    assert log.count("warning: matplotlib cannot be imported") == 2  # before the training, and at its end
    capsys.readouterr()
    table.main([str(out), "--plot", str(tmp_path / "comparison.png")])
    captured = capsys.readouterr()
    assert "Many  Medium    Few    All" in captured.out and "matplotlib cannot be imported" in captured.err
    assert not (tmp_path / "comparison.png").exists()


def test_the_comparison_of_one_epoch_runs_draws_their_points(tmp_path, monkeypatch):
    """One-point lines are not drawn: the accuracy-per-epoch panel of DEMO_EPOCHS=1 was empty."""
    from imbsam.train import report

    plt, figures = report._pyplot(), []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at
    m = dict(counts=[100, 10, 1], per_class=[90.0, 50.0, 10.0], all=50.0, few=10.0)
    report.plot_comparison([("sgd", m, [dict(epoch=1, all=50.0, few=10.0)])], "one epoch", str(tmp_path / "c.png"))
    per_epoch = figures[0].axes[1]
    assert len(per_epoch.lines) == 2
    for line in per_epoch.lines:  # All and Few, one point each: visible only as a marker
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "", " ")


def test_tail_passes_on_the_tail_samples_train_and_are_a_resume_key(cifar_root, tmp_path):
    """--tail-passes subset runs ImbSAM's tail passes on the tail samples (the synthetic
    CIFAR-10-LT's classes under --eta 6: the last four); a checkpoint of a full-pass run
    (or of one from before the option) does not resume as a subset one."""
    out = str(tmp_path / "subset")
    gn = ("--model", "resnet32-gn")
    metrics = main(args(cifar_root, out, "--opt", "imbsam", "--eta", "6", "--tail-passes", "subset", *gn))
    assert metrics["args"]["tail_passes"] == "subset" and 0 <= metrics["all"] <= 100
    assert "tail passes on the tail samples only" in open(os.path.join(out, "train.log")).read()
    older = str(tmp_path / "older")
    main(args(cifar_root, older, "--opt", "imbsam", "--eta", "6", "--max-epochs-this-run", "1", *gn))
    path = os.path.join(older, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    del ck["args"]["tail_passes"]  # what runs saved before the option recorded
    torch.save(ck, path)
    with pytest.raises(SystemExit, match="tail_passes='subset' \\(checkpoint: 'full'\\)"):
        main(args(cifar_root, older, "--opt", "imbsam", "--eta", "6", "--tail-passes", "subset", "--resume", *gn))


@pytest.mark.parametrize("extra,says", [(["--opt", "sam"], "ImbSAM's option"),
                                        (["--opt", "imbsam", "--cuda-graph"], "drop --cuda-graph"),
                                        (["--opt", "imbsam"], "--model resnet32 normalises with BatchNorm.*-gn")])
def test_tail_passes_subset_refuses_what_it_cannot_be(cifar_root, tmp_path, extra, says):
    with pytest.raises(SystemExit, match=f"--tail-passes subset: .*{says}"):
        main(args(cifar_root, str(tmp_path / "run"), "--tail-passes", "subset", *extra))
    assert not (tmp_path / "run").exists()


def test_a_sharpness_schedule_resumes_identically_and_is_a_resume_key(cifar_root, tmp_path):
    """--sharpness-schedule: the schedule's state (AE-SAM's statistics, its step count) is in
    the checkpoint, so a run split in two sharpens the same steps as one run."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    sched = ["--opt", "sam", "--sharpness-schedule", "aesam"]
    metrics = main(args(cifar_root, straight, *sched))
    assert metrics["args"]["sharpness_schedule"] == "aesam" and metrics["sharpened"]["steps"] == 12
    assert 0 < metrics["sharpened"]["sharpened"] <= 12
    main(args(cifar_root, split, *sched, "--max-epochs-this-run", "1"))
    main(args(cifar_root, split, *sched, "--resume"))
    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=False)
    assert a["optimizer"]["imbsam_sharpness_schedule"]["steps"] == 2 * 6  # 2 epochs of 6 batches of 16
    assert torch.equal(a["optimizer"]["imbsam_sharpness_schedule"]["mean"],
                       b["optimizer"]["imbsam_sharpness_schedule"]["mean"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(SystemExit, match="sharpness_schedule='periodic:2' \\(checkpoint: 'aesam'\\)"):
        main(args(cifar_root, split, "--opt", "sam", "--sharpness-schedule", "periodic:2", "--resume"))


@pytest.mark.parametrize("extra,says", [
    (["--sharpness-schedule", "periodic:0"], "allowed are every"), (["--sharpness-schedule", "bernoulli:2"], "P in"),
    (["--sharpness-schedule", "often"], "allowed are"), (["--opt", "sgd", "--sharpness-schedule", "periodic:2"],
                                                         "--opt sgd never does"),
    (["--sharpness-schedule", "periodic:2", "--cuda-graph"], "drop --cuda-graph")])
def test_a_sharpness_schedule_refuses_what_it_cannot_be(cifar_root, tmp_path, extra, says):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match=says):
        main(args(cifar_root, out, *extra))
    assert not os.path.exists(out)


@pytest.mark.parametrize("spec", ["periodic:2", "bernoulli:0.5"])
def test_imbsam_with_a_sharpness_schedule_and_tail_sample_passes_trains(cifar_root, tmp_path, spec):
    out = str(tmp_path / "run")
    metrics = main(args(cifar_root, out, "--opt", "imbsam", "--eta", "6", "--tail-passes", "subset", "--model",
                        "resnet32-gn", "--epochs", "1", "--sharpness-schedule", spec))
    assert metrics["args"]["sharpness_schedule"] == spec and 0 <= metrics["all"] <= 100
    if spec == "periodic:2":  # steps 0, 2, 4 of the 6
        assert metrics["sharpened"] == dict(steps=6, sharpened=3, fraction=0.5)
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ck["optimizer"]["imbsam_sharpness_schedule"]["steps"] == 6  # batches in the epoch
