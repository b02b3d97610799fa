"""imbsam.anomaly: Deep SAD's loss, score, split of the data, AUROC and ImbSAM's head/tail
split, each against a computation by hand or sklearn; the pipeline end to end on small
synthetic files in the real formats, its bitwise resume and its refusals."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from imbsam.anomaly import main
from imbsam.anomaly.auroc import auroc
from imbsam.anomaly.data import (
    LABELLED_ANOMALY,
    LABELLED_NORMAL,
    UNLABELLED,
    load_setting,
    semi_supervised_split,
    setting_counts,
)
from imbsam.anomaly.loss import EPS, centre_from, deep_sad_loss, head_tail_losses, sample_losses

from synthetic_data import write_cifar, write_fmnist


def by_hand(z, c, semi, eta):
    """Deep SAD's per-sample cost, one sample at a time in float64 (Ruff et al., eq. 4)."""
    out = []
    for zi, si in zip(z.double().tolist(), semi.tolist()):
        d = sum((a - b) ** 2 for a, b in zip(zi, c.double().tolist()))
        out.append(d if si == UNLABELLED else eta * (d + EPS) if si == LABELLED_NORMAL else eta / (d + EPS))
    return torch.tensor(out, dtype=torch.float64)


def test_loss_and_score_equal_the_formula_by_hand():
    torch.manual_seed(0)
    z, c = torch.randn(12, 5), torch.randn(5)
    semi = torch.tensor([0, 0, -1, 1, 0, -1, 0, 1, 0, 0, -1, 0])
    for eta in (1.0, 3.0):
        torch.testing.assert_close(sample_losses(z, c, semi, eta).double(), by_hand(z, c, semi, eta),
                                   rtol=1e-5, atol=0)  # float32 sums of 5 squares
        torch.testing.assert_close(deep_sad_loss(z, c, semi, eta).double(), by_hand(z, c, semi, eta).mean(),
                                   rtol=1e-5, atol=0)


def test_imbsam_tail_is_the_labelled_anomalies_terms_alone():
    """head + tail is the loss; the tail's gradient reaches only the labelled anomalies'
    embeddings and the head's only the others'."""
    torch.manual_seed(1)
    z, c = torch.randn(10, 4, requires_grad=True), torch.randn(4)
    semi = torch.tensor([0, -1, 0, 0, 1, -1, 0, 0, 0, -1])
    head, tail = head_tail_losses(z, c, semi, 2.0)
    torch.testing.assert_close(head + tail, deep_sad_loss(z, c, semi, 2.0))
    anomalous = semi == LABELLED_ANOMALY
    torch.testing.assert_close(tail.double(), by_hand(z.detach(), c, semi, 2.0)[anomalous].sum() / len(semi))
    (g_tail,) = torch.autograd.grad(tail, z, retain_graph=True)
    (g_head,) = torch.autograd.grad(head, z)
    assert bool((g_tail[~anomalous] == 0).all()) and bool((g_tail[anomalous] != 0).all())
    assert bool((g_head[anomalous] == 0).all()) and bool((g_head[~anomalous] != 0).all())


def test_centre_keeps_its_coordinates_off_zero():
    mean = torch.tensor([0.05, -0.05, 0.3, -0.2, 0.0, 0.1, -0.1])
    torch.testing.assert_close(centre_from(mean), torch.tensor([0.1, -0.1, 0.3, -0.2, 0.0, 0.1, -0.1]))


@pytest.mark.parametrize("gamma_l,gamma_p", [(0.05, 0.0), (0.01, 0.1), (0.2, 0.1), (0.0, 0.05)])
def test_counts_solve_deep_sads_equations(gamma_l, gamma_p):
    """The closed form against the linear system the ratios define (labelled normals 0):
    x = (labelled normal, unlabelled normal, unlabelled anomalies, labelled anomalies)."""
    n = 6000
    a = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [-gamma_l, -gamma_l, -gamma_l, 1 - gamma_l],
                  [0, -gamma_p, 1 - gamma_p, 0]], dtype=np.float64)
    x = np.linalg.solve(a, np.array([n, 0, 0, 0], dtype=np.float64))
    assert setting_counts(n, gamma_l, gamma_p) == (int(x[2]), int(x[3]))


def test_split_draws_the_ratios_from_the_right_classes():
    labels = np.repeat(np.arange(10), 500)
    index, semi = semi_supervised_split(labels, 3, 7, 0.05, 0.1, np.random.default_rng(0))
    assert len(np.unique(index)) == len(index)  # no image twice (labelled and unlabelled)
    y = labels[index]
    assert set(index[y == 3]) == set(np.flatnonzero(labels == 3))  # every normal image, unlabelled
    assert bool((semi[y == 3] == UNLABELLED).all())
    assert set(y[semi == LABELLED_ANOMALY]) == {7}
    unlabelled = semi == UNLABELLED
    n_unl, n_lab = setting_counts(500, 0.05, 0.1)
    assert (unlabelled & (y != 3)).sum() == n_unl and (semi == LABELLED_ANOMALY).sum() == n_lab
    assert abs((unlabelled & (y != 3)).sum() / unlabelled.sum() - 0.1) < 1 / unlabelled.sum()
    assert abs(n_lab / len(index) - 0.05) < 1 / len(index)
    again = semi_supervised_split(labels, 3, 7, 0.05, 0.1, np.random.default_rng(0))
    assert (again[0] == index).all() and (again[1] == semi).all()
    # Few anomalies to draw from: a labelled one drawn again as unlabelled would show.
    few = np.repeat([0, 1], [100, 60])
    index, semi = semi_supervised_split(few, 0, 1, 0.2, 0.2, np.random.default_rng(0))
    assert len(np.unique(index)) == len(index) == 100 + sum(setting_counts(100, 0.2, 0.2)) == 156
    with pytest.raises(ValueError, match="labelled anomalies of class 7"):
        semi_supervised_split(labels, 3, 7, 0.6, 0.0, np.random.default_rng(0))


def test_auroc_equals_sklearn_with_ties():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 400))
        y = rng.random(n) < rng.uniform(0.05, 0.95)
        y[0], y[1] = True, False
        scores = rng.integers(0, 1 + trial, n).astype(np.float32) if trial % 2 else rng.normal(size=n)
        assert auroc(torch.from_numpy(scores), torch.from_numpy(y)) == pytest.approx(
            sklearn.roc_auc_score(y, scores), abs=1e-12)


def test_auroc_refuses_what_it_cannot_rank():
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.rand(5), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="not finite"):
        auroc(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([True, False, True]))


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    return write_fmnist(str(tmp_path_factory.mktemp("fmnist")), per_class=30, test_per_class=8)


def cli(root, out, *extra):
    return ["--data-root", root, "--no-download", "--gamma-l", "0.1", "--batch-size", "32", "--ae-epochs", "2",
            "--ae-lr-milestone", "1", "--epochs", "3", "--lr-milestone", "2", "--device", "cpu", "--out", out,
            "--no-progress", *extra]


def final_weights(out, opt):
    return torch.load(os.path.join(out, opt, "checkpoint.pt"), weights_only=True)["model"]


def test_end_to_end_every_optimizer_from_one_pretraining(fmnist_root, tmp_path):
    out = str(tmp_path / "run")
    results = main(cli(fmnist_root, out, "--opt", "adam", "sam", "asam", "imbsam"))
    assert list(results) == ["adam", "sam", "asam", "imbsam"]
    for opt, m in results.items():
        with open(os.path.join(out, opt, "metrics.json")) as f:
            assert json.load(f) == json.loads(json.dumps(m))
        assert 0 <= m["auroc"] <= 1 and len(m["history"]) == 3
        assert m["counts"]["labelled_anomalies"] == setting_counts(30, 0.1, 0)[1] == 3
        assert m["backend"] == ("-" if opt == "adam" else "cpp")
    # The optimizers differ, so their networks do: each really trained with its own.
    weights = {opt: final_weights(out, opt)["fc2.weight"] for opt in results}
    assert all(not torch.equal(weights[a], weights[b]) for a in weights for b in weights if a < b)
    with open(os.path.join(out, "train.log")) as f:
        log = f.read()
    assert "x Adam" in log and "imbsam" in log.splitlines()[-1]


@pytest.mark.parametrize("bn_stats", ["keep", "update"])
def test_at_rho_0_every_optimizer_is_adam(fmnist_root, tmp_path, bn_stats):
    """The same pre-trained start, the same centre and the same batches in the same order
    for every optimizer: at rho = 0 SAM's and ImbSAM's steps are Adam's, so their weights
    end equal to rounding (a different batch order alone would part them). With
    ``--perturbed-bn-stats keep`` their BatchNorm statistics, and so their AUROCs, are
    Adam's too; with ``update`` (the paper's loop) the forward at w + e moves them again."""
    out = str(tmp_path / "run")
    results = main(cli(fmnist_root, out, "--opt", "adam", "sam", "imbsam", "--rho", "0", "--batch-size", "8",
                       "--perturbed-bn-stats", bn_stats))
    adam = final_weights(out, "adam")
    for opt in ("sam", "imbsam"):
        other = final_weights(out, opt)
        for k, v in adam.items():
            statistics = "running" in k or "num_batches" in k
            if statistics and bn_stats == "update":
                assert not torch.equal(other[k], v), f"{opt} {k}"
            else:
                torch.testing.assert_close(other[k], v, rtol=1e-4, atol=1e-6, msg=f"{opt} {k}")
        if bn_stats == "keep":
            assert results[opt]["auroc"] == pytest.approx(results["adam"]["auroc"], abs=1e-9)


def test_imbsam_without_labelled_anomalies_in_the_batch_is_adams_step(fmnist_root):
    """ImbSAM's perturbation comes from the labelled anomalies' loss alone: on a batch
    without any, e = 0 and the step is Adam's on the same loss."""
    import argparse

    from imbsam.anomaly.models import FashionMNISTEncoder
    from imbsam.anomaly.run import build_optimizer
    from imbsam.train.step import make_step
    args = argparse.Namespace(lr=1e-3, weight_decay=5e-7, rho=0.5, backend="reference")
    x, semi = torch.rand(16, 1, 28, 28), torch.zeros(16, dtype=torch.int64)
    c = torch.full((64,), 0.1)
    nets = {}
    for opt in ("adam", "imbsam"):
        torch.manual_seed(0)
        net = FashionMNISTEncoder()
        optimizer = build_optimizer(opt, net.parameters(), args)
        step = make_step("sgd" if opt == "adam" else "imbsam", net, optimizer,
                         split=lambda z, s: head_tail_losses(z, c, s, 1.0),
                         loss_fn=lambda z, s: deep_sad_loss(z, c, s, 1.0))
        for _ in range(2):
            step(x, semi)
        nets[opt] = dict(net.named_parameters())
    for k in nets["adam"]:
        torch.testing.assert_close(nets["imbsam"][k], nets["adam"][k], rtol=1e-6, atol=1e-7)
    semi[3] = LABELLED_ANOMALY  # one labelled anomaly: now the tail perturbs, and the steps differ
    torch.manual_seed(0)
    net = FashionMNISTEncoder()
    optimizer = build_optimizer("imbsam", net.parameters(), args)
    step = make_step("imbsam", net, optimizer, split=lambda z, s: head_tail_losses(z, c, s, 1.0))
    for _ in range(2):
        step(x, semi)
    assert not torch.allclose(net.fc2.weight, nets["adam"]["fc2.weight"], rtol=1e-6, atol=1e-7)


def test_resume_continues_bitwise(fmnist_root, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    expected = main(cli(fmnist_root, whole, "--opt", "adam", "imbsam"))
    # 2 pre-training epochs + 3 of Adam + 3 of ImbSAM, in three sessions cut mid-stage;
    # Adam's is cut before its lr drops (after epoch 2), so the scheduler's state matters.
    assert main(cli(fmnist_root, split, "--opt", "adam", "imbsam", "--max-epochs-this-run", "1")) is None
    assert main(cli(fmnist_root, split, "--opt", "adam", "imbsam", "--max-epochs-this-run", "2", "--resume")) is None
    resumed = main(cli(fmnist_root, split, "--opt", "adam", "imbsam", "--resume"))
    for opt in ("adam", "imbsam"):
        a, b = final_weights(whole, opt), final_weights(split, opt)
        assert all(torch.equal(a[k], b[k]) for k in a), opt
        assert resumed[opt]["auroc"] == expected[opt]["auroc"]
    # Another optimizer later, from the same pre-training.
    more = main(cli(fmnist_root, split, "--opt", "sam", "--resume"))
    assert list(more) == ["sam"]


@pytest.mark.parametrize("extra,message", [
    (["--normal-class", "10"], "--normal-class 10: allowed 0 to 9"),
    (["--normal-class", "4", "--known-anomaly-class", "4"], "other than the normal class"),
    (["--gamma-l", "1"], "--gamma-l 1: a share"),
    (["--gamma-p", "-0.1"], "--gamma-p -0.1: a share"),
    (["--gamma-l", "0", "--opt", "adam", "imbsam"], "there are none, so it would be Adam"),
    (["--rho", "nan"], "--rho nan is not finite"),
    (["--eta", "0"], "--eta 0: Deep SAD's weight must be above 0"),
    (["--batch-size", "1"], "--batch-size 1: at least 2"),
    (["--opt", "sam", "sam"], "an optimizer named twice"),
    (["--epochs", "0"], "--epochs 0: at least 1"),
    (["--backend", "cuda", "--opt", "sam"], "--backend cuda"),
    (["--seed", "-1"], "--seed -1: at least 0"),
    (["--gamma-l", "0.01"], "--gamma-l 0.01 of 30 normal images gives no labelled anomaly"),
])
def test_bad_options_are_refused_before_anything_is_written(fmnist_root, tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        main(cli(fmnist_root, str(out), *extra))
    assert not out.exists()


def test_an_existing_run_needs_resume_and_the_same_options(fmnist_root, tmp_path):
    out = str(tmp_path / "run")
    assert main(cli(fmnist_root, out, "--opt", "adam", "--max-epochs-this-run", "1")) is None
    with pytest.raises(SystemExit, match="pass --resume"):
        main(cli(fmnist_root, out, "--opt", "adam"))
    with pytest.raises(SystemExit, match=r"--seed 5 \(before: 0\)"):
        main(cli(fmnist_root, out, "--opt", "adam", "--resume", "--seed", "5"))
    # The same options on other data (another --data-root) are another setting.
    other_root = write_fmnist(str(tmp_path / "other"), per_class=30, test_per_class=8, seed=1)
    with pytest.raises(SystemExit, match=r"other data \(--data-root .*other"):
        main(cli(other_root, out, "--opt", "adam", "--resume"))
    # Adam does not use rho: a finished Adam run is reused whatever --rho says.
    main(cli(fmnist_root, out, "--opt", "adam", "--resume"))
    assert list(main(cli(fmnist_root, out, "--opt", "adam", "--resume", "--rho", "0.3"))) == ["adam"]


def test_cifar10_setting_and_network_on_synthetic_files(tmp_path):
    from imbsam.anomaly.models import build_autoencoder
    root = write_cifar(str(tmp_path), 10, per_class=20, test_per_class=5)
    s = load_setting("cifar10", root, 5, 3, 0.05, 0.1, seed=0, download=False, verify=False)
    assert s.train_x.shape[1:] == (3, 32, 32) and s.counts() == dict(normal=20, unlabelled_anomalies=2,
                                                                      labelled_anomalies=1)
    ae = build_autoencoder("cifar10")
    x = s.train_x[:4].float() / 255
    assert ae(x).shape == x.shape and ae.encoder(x).shape == (4, 128)


def test_table_summarises_runs_and_plots(fmnist_root, tmp_path):
    from imbsam.anomaly import table
    runs = []
    for normal, seed in ((0, 0), (0, 1), (2, 0)):
        out = str(tmp_path / f"c{normal}s{seed}")
        main(cli(fmnist_root, out, "--opt", "adam", "imbsam", "--normal-class", str(normal), "--seed", str(seed),
                 "--ae-epochs", "0", "--epochs", "1"))
        runs.append(out)
    s = table.main([*runs, "--plot", str(tmp_path / "t.png"), "--plot-curves", str(tmp_path / "c.png"),
                    "--json", str(tmp_path / "t.json")])
    assert s["classes"] == [0, 2] and s["optimizers"] == ["adam", "imbsam"] and s["seeds"] == [0, 1]
    ms = [json.load(open(os.path.join(r, "imbsam", "metrics.json"))) for r in runs]
    assert s["auroc"]["imbsam"][0][0] == pytest.approx(100 * (ms[0]["auroc"] + ms[1]["auroc"]) / 2)
    assert s["auroc"]["imbsam"][0][2] == 2 and s["overall"]["imbsam"]["runs"] == 3
    adam = [json.load(open(os.path.join(r, "adam", "metrics.json"))) for r in runs]
    diffs = [100 * (m["auroc"] - a["auroc"]) for m, a in zip(ms, adam)]
    assert s["overall"]["imbsam"]["minus_adam"][0] == pytest.approx(sum(diffs) / 3)
    assert s["overall"]["imbsam"]["minus_adam"][2:] == (sum(d > 0 for d in diffs), 3)
    assert os.path.getsize(tmp_path / "t.png") > 0 and os.path.getsize(tmp_path / "c.png") > 0
    other = str(tmp_path / "other")
    main(cli(fmnist_root, other, "--opt", "adam", "imbsam", "--ae-epochs", "0", "--epochs", "2"))
    with pytest.raises(SystemExit, match="mix settings.*epochs: 1, 2"):
        table.main([runs[0], other])
    rho = str(tmp_path / "rho")
    main(cli(fmnist_root, rho, "--opt", "adam", "imbsam", "--ae-epochs", "0", "--epochs", "1", "--rho", "0.1",
             "--normal-class", "5"))
    with pytest.raises(SystemExit, match="mix settings.*rho: 0.05, 0.1"):
        table.main([runs[0], rho])
    with pytest.raises(SystemExit, match="class 0, seed 0 is given twice"):
        table.main([runs[0], runs[0]])
    partial = str(tmp_path / "partial")
    main(cli(fmnist_root, partial, "--opt", "adam", "--ae-epochs", "0", "--epochs", "1", "--normal-class", "7"))
    with pytest.raises(SystemExit, match="class 7 seed 0 lacks imbsam"):
        table.main([runs[0], partial, "--plot", str(tmp_path / "p.png")])


def test_sweep_script_runs_fills_gaps_and_tabulates(fmnist_root, tmp_path):
    import shutil
    import subprocess
    import sys
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "sweep")
    env = dict(os.environ, PYTHON=sys.executable, EPOCHS="1", SEEDS="0", CLASSES="0 3", JOBS="2",
               ANOMALY_ARGS=f"--data-root {fmnist_root} --no-download --gamma-l 0.1 --batch-size 32 --device cpu")
    script = os.path.join(root, "scripts", "anomaly_sweep.sh")
    done = subprocess.run(["bash", script, out], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("done") == 2
    with open(os.path.join(out, "class3-seed0", "imbsam", "metrics.json")) as f:
        m = json.load(f)
    assert m["args"]["normal_class"] == 3 and m["args"]["gamma_l"] == 0.1 and m["epochs"] == m["ae_epochs"] == 1
    shutil.rmtree(os.path.join(out, "class0-seed0", "sam"))  # a gap: only that setting runs again
    again = subprocess.run(["bash", script, out], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done") == 1 and "class 0 seed 0" in again.stdout
    from imbsam.anomaly import table
    assert table.main([os.path.join(out, "class0-seed0"), os.path.join(out, "class3-seed0")])["classes"] == [0, 3]


def test_backends_agree_in_the_pipeline(fmnist_root, tmp_path):
    """ImbSAM and SAM over Adam, fused (cpp) against the reference: the same AUROCs and
    weights to rounding."""
    runs = {}
    for backend in ("reference", "cpp"):
        out = str(tmp_path / backend)
        runs[backend] = main(cli(fmnist_root, out, "--opt", "sam", "imbsam", "--backend", backend))
        runs[backend]["weights"] = {opt: final_weights(out, opt) for opt in ("sam", "imbsam")}
    for opt in ("sam", "imbsam"):
        assert runs["cpp"][opt]["backend"] == "cpp" and runs["reference"][opt]["backend"] == "reference"
        assert runs["cpp"][opt]["auroc"] == pytest.approx(runs["reference"][opt]["auroc"], abs=0.02)
        for k, v in runs["reference"]["weights"][opt].items():
            torch.testing.assert_close(runs["cpp"]["weights"][opt][k], v, rtol=1e-4, atol=1e-6)


def test_cifar10_end_to_end_with_pollution(tmp_path):
    """CIFAR-10 for a user who has it: the command on synthetic files in the real format,
    with unlabelled anomalies (gamma_p) in the training set."""
    root = write_cifar(str(tmp_path / "data"), 10, per_class=40, test_per_class=5)
    out = str(tmp_path / "run")
    results = main(["--dataset", "cifar10", "--data-root", root, "--no-download", "--skip-checksum",
                    "--normal-class", "5", "--gamma-l", "0.05", "--gamma-p", "0.1", "--batch-size", "16",
                    "--ae-epochs", "1", "--epochs", "1", "--device", "cpu", "--out", out, "--no-progress",
                    "--opt", "adam", "imbsam"])
    assert results["imbsam"]["counts"] == dict(normal=40, unlabelled_anomalies=4, labelled_anomalies=2)
    assert results["imbsam"]["args"]["known_anomaly_class"] == 6
