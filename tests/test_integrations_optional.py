"""What every integration owes a user who has not installed its framework, or who runs its
example: ``import imbsam`` never imports a framework, the integration's import names the
extra to install, and each example trains."""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# integration module, the framework it imports, the extra; the example and its arguments
INTEGRATIONS = [
    ("imbsam.integrations.lightning", "lightning", "lightning", "lightning_imbsam", ["--steps", "20"]),
    ("imbsam.integrations.timm", "timm", "timm", "timm_imbsam", ["--steps", "4"]),
    ("imbsam.integrations.hf", "transformers", "hf", "hf_imbsam", ["--steps", "4"]),
]
IDS = [row[2] for row in INTEGRATIONS]


def framework_or_skip(package: str) -> None:
    if os.environ.get("CI"):  # CI installs them (requirements.txt): missing there is a failure
        importlib.import_module(package)
    else:
        pytest.importorskip(package, reason=f"needs {package}")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_imbsam_itself_imports_no_framework():
    frameworks = [row[1] for row in INTEGRATIONS]
    done = python(f"import sys, imbsam, imbsam.integrations; print([m for m in {frameworks} if m in sys.modules])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("module,package,extra,example,argv", INTEGRATIONS, ids=IDS)
def test_without_its_framework_the_import_names_the_extra(module, package, extra, example, argv):
    done = python(f"import sys; sys.modules[{package!r}] = None\nimport {module}")
    assert done.returncode != 0
    assert f"{module} needs {package}: pip install 'imbsam[{extra}]'" in done.stderr.lower()


@pytest.mark.parametrize("module,package,extra,example,argv", INTEGRATIONS, ids=IDS)
def test_the_example_trains(module, package, extra, example, argv):
    framework_or_skip(package)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        script = importlib.import_module(example)
    finally:
        sys.path.pop(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = script.main(argv)
    assert math.isfinite(result) and result > 0
    if extra == "lightning":  # it returns the training accuracy: six overlapping classes, the majority is 0.47
        assert result > 0.6
