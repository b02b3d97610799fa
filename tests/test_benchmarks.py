"""Every benchmark script, run on the CPU with the fewest repetitions: they are what the
GPU session runs, so an API one of them uses that a torch version lacks should show here
first. Checks the records' shape (the fields the results format promises), not the numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import imbsam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import plot_results  # noqa: E402

REQUIRED = {"bench", "gpu", "torch", "date", "model", "dtype", "method", "backend", "ms", "command"}


def run_benchmark(tmp_path, script, *args):
    out = tmp_path / "records.json"
    # Without Triton's interpreter, which would take most of the time: on the CPU the
    # benchmarks compare the reference, torch._foreach and the C++ kernels.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    records = json.loads(out.read_text())
    assert records, "no records"
    for record in records:
        assert REQUIRED <= record.keys(), REQUIRED - record.keys()
        assert record["ms"] > 0 and record["gpu"] is None and record["device"] == "cpu"
    return records


def assert_plotted(tmp_path) -> None:
    """plot_results draws the records just written (python_overhead records are not plotted)."""
    png = plot_results.plot_file(str(tmp_path / "records.json"), str(tmp_path))
    assert png == str(tmp_path / "records.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_optimizer_step(tmp_path):
    records = run_benchmark(tmp_path, "bench_optimizer_step.py", "--model", "resnet32", "--reps", "1",
                            "--dtypes", "float32,bfloat16")
    assert {r["bench"] for r in records} == {"optimizer_step"}
    assert {(r["method"], r["dtype"]) for r in records} >= {("sam", "float32"), ("imbsam", "bfloat16")}
    assert {"reference", "paper", "foreach"} <= {r["backend"] for r in records}
    # The ratios against what a user would run instead, on every record.
    assert all(r["speedup_vs_paper"] > 0 and r["speedup_vs_foreach"] > 0 for r in records)
    assert_plotted(tmp_path)


def test_ops(tmp_path):
    records = run_benchmark(tmp_path, "bench_ops.py", "--model", "resnet32", "--reps", "1")
    assert {r["bench"] for r in records} == {"op"}
    assert_plotted(tmp_path)


def test_python_overhead(tmp_path):
    records = run_benchmark(tmp_path, "bench_python_overhead.py", "--model", "resnet32", "--steps", "2")
    assert {(r["method"], r["base"], r["part"]) for r in records} == {
        (m, b, p) for m in ("sam", "imbsam") for b in ("sgd", "adamw") for p in ("step", "ops")}
    assert plot_results.plot_file(str(tmp_path / "records.json"), str(tmp_path)) is None


def test_python_overhead_refuses_an_unknown_base(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "bench_python_overhead.py")
    result = subprocess.run([sys.executable, script, "--bases", "sgd,adam", "--out", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--bases: each of sgd, adamw, got 'sgd,adam'" in result.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif("triton" not in imbsam.available_backends(), reason="needs the triton backend")
def test_python_overhead_of_triton_with_stubbed_launches_beside_cpp(tmp_path):
    records = run_benchmark(tmp_path, "bench_python_overhead.py", "--model", "resnet32", "--steps", "2",
                            "--rounds", "1", "--backends", "cpp,triton", "--stub-launches")
    assert {r["backend"] for r in records} == {"cpp", "triton"}
    triton = [r for r in records if r["backend"] == "triton"]
    # norm, perturb, the fused restore + SGD or AdamW step
    assert all(r["stub_launches"] and r["launches_per_step"] >= 3 for r in triton)
    assert {r["base"] for r in triton} == {"sgd", "adamw"}


def test_train_iter(tmp_path):
    records = run_benchmark(tmp_path, "bench_train_iter.py", "--model", "resnet32", "--device", "cpu", "--batch", "2",
                            "--reps", "1", "--variants", "eager")
    assert {r["bench"] for r in records} == {"train_iter"}
    assert {r["method"] for r in records} == {"sgd", "sam", "imbsam"}
    assert_plotted(tmp_path)


def test_tail_passes(tmp_path):
    records = run_benchmark(tmp_path, "bench_tail_passes.py", "--batch", "8", "--rounds", "1", "--reps", "1")
    assert [r["method"] for r in records] == ["sgd", "sam", "imbsam", "imbsam-tail", "sam@periodic:2", "sam@aesam",
                                              "imbsam@periodic:4", "imbsam@bernoulli:0.25", "imbsam@aesam",
                                              "imbsam-tail@periodic:4", "imbsam-tail@aesam"]
    assert records[0]["ratio_to_sgd"] == 1.0 and all(r["ratio_to_sgd"] > 0 for r in records)
    shares = {r["method"]: r["sharpened_share"] for r in records}
    # Timed after a warm-up of whole periods: one step in 2 (or 4) of the one timed.
    assert shares["sgd"] is None and shares["imbsam"] == 1.0 and shares["sam@periodic:2"] == 1.0
    assert shares["imbsam@periodic:4"] == 1.0 and 0 <= shares["imbsam@aesam"] <= 1
    assert 0 <= records[0]["tail_share"] < 0.5
    assert_plotted(tmp_path)


def test_tail_passes_refuses_an_unknown_method(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_tail_passes.py"), "--methods",
                             "sgd,sgd@periodic:2", "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert result.returncode != 0 and "sgd without a schedule" in result.stderr and not (tmp_path / "r.json").exists()


def test_tail_passes_needs_sgd_to_compare_with(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_tail_passes.py"), "--methods",
                             "sam,imbsam-tail", "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert result.returncode != 0 and "sgd is missing" in result.stderr and not (tmp_path / "r.json").exists()


def test_adam_step(tmp_path):
    records = run_benchmark(tmp_path, "bench_adam_step.py", "--model", "resnet32", "--reps", "1")
    assert {r["bench"] for r in records} == {"adam_step"}
    backends = {r["backend"] for r in records}
    assert {"reference", "generic-foreach", "generic-fused"} <= backends and "cpp" in backends
    assert all(r["x_floor"] > 0 and r["speedup_vs_generic"] > 0 for r in records)
    assert_plotted(tmp_path)


def test_tail_passes_on_the_batchnorm_model_refuses_the_tail_passes(tmp_path):
    records = run_benchmark(tmp_path, "bench_tail_passes.py", "--batch", "8", "--rounds", "1", "--reps", "1",
                            "--model", "resnet32", "--methods", "sgd,imbsam@periodic:8")
    assert [(r["model"], r["method"]) for r in records] == [("resnet32", "sgd"), ("resnet32", "imbsam@periodic:8")]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_tail_passes.py"), "--model",
                             "resnet32", "--methods", "sgd,imbsam-tail", "--out", str(tmp_path / "r.json")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "refuse --model resnet32's BatchNorm" in result.stderr
