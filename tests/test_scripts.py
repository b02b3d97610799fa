"""The prepared GPU scripts, run here with a stand-in Python that only records its calls:
a typo in them would otherwise first show on a device machine, whose minutes are few."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# Records each call; for `-m imbsam.train ... --out DIR` writes what a finished run leaves.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_CALLS"
sleep "${FAKE_SECONDS:-0}"
[[ -n "${FAKE_PIP_FAILS:-}" && "$*" == *"pip install"* ]] && exit 1
if [[ "$*" == *"-m imbsam.train"* ]]; then
  out=""; prev=""
  for a in "$@"; do [[ "$prev" == "--out" ]] && out="$a"; prev="$a"; done
  mkdir -p "$out"
  echo "epoch 200/200 lr 0.00e+00 loss 0.1 acc 99.0" > "$out/train.log"
  echo "weights" > "$out/checkpoint.pt"
  echo "{}" > "$out/metrics.json"
fi
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    calls = tmp_path / "calls.log"
    return dict(os.environ, PYTHON=str(path), FAKE_CALLS=str(calls)), calls


def run_script(name, env, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", name), *args], env=env, capture_output=True,
                          text=True, timeout=120)


STAGES = ["build", "backends", "tests", "optimizer_step_resnet34", "ops", "train_iter", "tail_passes",
          "optimizer_step_vit_b_16", "adam_step_vit_b_16", "python_overhead", "done"]


def test_gpu_check_runs_every_stage_in_order(tmp_path, fake_python):
    env, calls = fake_python
    out = tmp_path / "out"
    result = run_script("gpu_check.sh", env, str(out))
    assert result.returncode == 0, result.stderr
    log = (out / "run.log").read_text()
    positions = [log.index(f"== {s}") for s in STAGES]
    assert positions == sorted(positions), log
    assert "skipped" not in log and (out / "env.txt").exists()
    recorded = calls.read_text()
    assert "IMBSAM_BUILD_CUDA" not in recorded  # env is set by `env`, not passed to python
    for script in ("bench_optimizer_step.py", "bench_ops.py", "bench_train_iter.py", "bench_tail_passes.py",
                   "bench_adam_step.py", "bench_python_overhead.py"):
        assert f"benchmarks/{script} --out " in recorded, script
    assert all("--device cuda" in line for line in recorded.splitlines() if "benchmarks/" in line)
    assert "--model vit_b_16" in recorded and "-k gpu or cuda or triton tests/test_gpu.py tests/test_ops.py" in recorded
    assert sorted(os.listdir(out)) == ["bench.tar.gz", "env.txt", "run.log", "tests.log"]  # the fake writes no XML


def test_gpu_check_builds_in_place_when_pip_fails(tmp_path, fake_python):
    env, calls = fake_python
    out = tmp_path / "out"
    result = run_script("gpu_check.sh", dict(env, FAKE_PIP_FAILS="1"), str(out))
    assert result.returncode == 0, result.stderr
    log = (out / "run.log").read_text()
    assert "== build: rc=1" in log and "== build-inplace: rc=0" in log
    assert log.index("== build-inplace") < log.index("== backends") < log.index("== tests")
    assert "setup.py build_ext --inplace" in calls.read_text()


def test_gpu_check_cuts_stages_when_the_budget_is_spent(tmp_path, fake_python):
    env, _ = fake_python
    out = tmp_path / "out"
    # Each call takes a second: the first stages fit in 36 s (less the 20 s kept for a cut
    # stage's exit and the packing), the last ones are skipped.
    result = run_script("gpu_check.sh", dict(env, GPU_CHECK_BUDGET_S="36", FAKE_SECONDS="1"), str(out))
    assert result.returncode == 0, result.stderr
    log = (out / "run.log").read_text()
    assert "== build: rc=0" in log and "== tests: rc=0" in log
    assert "== python_overhead: skipped, the budget is spent" in log and "== done" in log


def test_gpu_check_skips_the_build_on_a_rerun(tmp_path, fake_python):
    env, calls = fake_python
    out = tmp_path / "out"
    result = run_script("gpu_check.sh", dict(env, GPU_SKIP_BUILD="1"), str(out))
    assert result.returncode == 0, result.stderr
    assert "== build: skipped (GPU_SKIP_BUILD=1)" in (out / "run.log").read_text()
    assert "pip install" not in calls.read_text() and "build_ext" not in calls.read_text()


def test_gpu_check_dry_run_on_the_cpu_writes_every_file_it_promises(tmp_path):
    """GPU_CHECK_DRY=1 with this Python: the real pytest and benchmark scripts with the
    script's own flags (the device parts stubbed: the CPU, the smallest sizes), end to end."""
    import json
    import sys
    import xml.etree.ElementTree as ElementTree

    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DRY="1", OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    log = (out / "run.log").read_text()
    for stage in STAGES[1:-1]:
        assert f"== {stage}: rc=0" in log, log
    assert sorted(os.listdir(out)) == ["bench.tar.gz", "env.txt", "run.log", "tests.log", "tests.xml"]
    assert ElementTree.parse(out / "tests.xml").getroot().iter("testcase")
    with tarfile.open(out / "bench.tar.gz") as archive:
        names = sorted(n for n in archive.getnames() if n.endswith(".json"))
        assert names == sorted(f"./{s}.json" for s in STAGES[3:-1])
        for name in names:
            assert json.load(archive.extractfile(name)), name


def test_gpu_train_packs_each_run_without_its_checkpoint(tmp_path, fake_python):
    env, calls = fake_python
    data = tmp_path / "fmnist"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")
    out = tmp_path / "out"
    result = run_script("gpu_train.sh", dict(env, GPU_TRAIN_DATA=str(data)), str(out), "sgd", "imbsam")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["env.txt", "imbsam.tar.gz", "run.log", "sgd.tar.gz"]
    with tarfile.open(out / "sgd.tar.gz") as tar:
        names = tar.getnames()
    assert "sgd/train.log" in names and "sgd/metrics.json" in names
    assert not any(n.endswith("checkpoint.pt") for n in names)
    train_calls = [line for line in calls.read_text().splitlines() if "-m imbsam.train" in line]
    assert len(train_calls) == 2
    for opt, line in zip(("sgd", "imbsam"), train_calls):
        for flag in (f"--opt {opt}", "--dataset fmnist-lt", "--model resnet34", "--epochs 200", "--cuda-graph",
                     f"--data-root {data}", "--time-limit-s"):
            assert flag in line, (flag, line)


def test_gpu_train_says_where_the_data_must_be(tmp_path, fake_python):
    env, _ = fake_python
    result = run_script("gpu_train.sh", dict(env, GPU_TRAIN_DATA=str(tmp_path / "none")), str(tmp_path / "o"),
                        "sgd")
    assert result.returncode == 2
    assert "no Fashion-MNIST files" in (tmp_path / "o" / "run.log").read_text()


def test_accuracy_against_cost_groups_seeds_and_finds_each_methods_cost(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("accuracy_against_cost",
                                                  os.path.join(ROOT, "scripts", "accuracy_against_cost.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(name, opt, seed, few, **args):
        d = tmp_path / name
        d.mkdir()
        recipe = dict(dataset="fmnist-lt", imb_factor=100.0, model=args.pop("model", "resnet32"), epochs=30,
                      batch_size=64, lr=0.01, momentum=0.9, weight_decay=1e-3, rho=0.05, eta=240.0, tail_weight=2.0,
                      amp="none", seed=seed, **args)
        metrics = dict(opt=opt, many=95.0, medium=70.0, few=few, all=87.0, model=recipe["model"], args=recipe)
        if args.get("sharpness_schedule", "every") != "every":
            metrics["sharpened"] = dict(steps=8, sharpened=1, fraction=0.125)
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "history.json").write_text(json.dumps([{"epoch_s": 10.0 * seed}, {"epoch_s": 12.0 * seed}]))
        return str(d)

    runs = [run("a", "imbsam", 1, 95.0), run("b", "imbsam", 2, 94.0),
            run("c", "imbsam", 1, 93.0, sharpness_schedule="periodic:8"),
            run("d", "imbsam", 1, 92.0, tail_passes="subset", model="resnet32-gn")]
    costs = tmp_path / "bench.json"
    costs.write_text(json.dumps([dict(bench="tail_passes", model="resnet32", method="imbsam", ratio_to_sgd=2.8),
                                 dict(bench="tail_passes", model="resnet32", method="imbsam@periodic:8",
                                      ratio_to_sgd=1.22),
                                 dict(bench="tail_passes", model="resnet32-gn", method="imbsam", ratio_to_sgd=9.9)]))
    rows = script.main([*runs, "--costs", str(costs), "--table", str(tmp_path / "t.md"),
                        "--plot", str(tmp_path / "p.png")])
    got = [(r["method"], r["model"], r["seeds"], r["few"][0], r["cost"], r["sharpened"]) for r in rows]
    assert got == [("imbsam", "resnet32", [1, 2], 94.5, 2.8, 1.0),
                   ("imbsam periodic:8", "resnet32", [1], 93.0, 1.22, 0.125),
                   ("imbsam tail passes", "resnet32-gn", [1], 92.0, None, 1.0)]  # no imbsam-tail record
    table = (tmp_path / "t.md").read_text()
    assert "| imbsam | resnet32 | 1, 2 | 95.0 ± 0.0 | 70.0 ± 0.0 | 94.5 ± 0.7 |" in table and "not measured" in table
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
