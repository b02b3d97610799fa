"""The CUDA launcher's packing (csrc/cuda/mta_plan.h), compiled for and run on the host."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("large_args", [0, 1], ids=["4KiB-args", "32KiB-args"])
def test_every_chunk_lands_in_exactly_one_block(tmp_path, large_args):
    exe = str(tmp_path / "mta_plan_check")
    subprocess.run(["g++", "-std=c++17", "-O1", f"-DIMBSAM_MTA_LARGE_ARGS={large_args}", "-I",
                    os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "mta_plan_check.cpp"), "-o", exe],
                   check=True)
    result = subprocess.run([exe], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("failures 0")
