"""The style the project holds, checked in CI: ruff (pyproject.toml's [tool.ruff]) over the
Python tree, and clang-format (.clang-format) over the C++ and CUDA sources."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tree is formatted with Debian 12's clang-format; other majors lay some lines out
# differently, so they are not asked.
CLANG_FORMAT_MAJOR = 14


def test_ruff_passes():
    pytest.importorskip("ruff", reason="ruff is not installed (requirements.txt installs it)")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def cpp_sources() -> list[str]:
    patterns = ("csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh", "tests/**/*.cpp", "tests/**/*.h")
    return sorted({f for p in patterns for f in glob.glob(os.path.join(ROOT, p), recursive=True)})


def test_clang_format_passes():
    tool = shutil.which("clang-format")
    if tool is None:
        pytest.skip("clang-format is not installed (the quickstart installs Debian's)")
    version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    major = re.search(r"version (\d+)", version)
    if major is None or int(major.group(1)) != CLANG_FORMAT_MAJOR:
        pytest.skip(f"the tree is formatted with clang-format {CLANG_FORMAT_MAJOR}; this is {version.strip()!r}")
    files = cpp_sources()
    assert len(files) > 20, files
    result = subprocess.run([tool, "--dry-run", "-Werror", *files], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
