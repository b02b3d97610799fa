"""The machine code of the built CUDA kernels (read with cuobjdump, no GPU needed): every
multi-tensor kernel moves its lists with 16-byte loads and stores on the aligned path.
A split access runs, but costs instructions and bandwidth; nvcc split restore's source
load into four 4-byte ones once, which this test would have caught."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

import imbsam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # Triton ships one
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def kernels():
    tool = cuobjdump()
    library = glob.glob(os.path.join(os.path.dirname(imbsam.__file__), "_C*.so"))
    if tool is None or not library:
        pytest.skip("needs cuobjdump and the built imbsam._C")
    sass = subprocess.run([tool, "-sass", library[0]], capture_output=True, text=True).stdout
    found = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0]
        match = re.search(r"(SumSquares|Perturb|Copy|Add|Sgd)Functor", name)
        if match and "multi_tensor_kernel" in name:
            storage = "double" if re.search(r"Functor(I|Ii?)d", name) else "other"
            found[name] = (match.group(1), storage, chunk)
    if not found:
        pytest.skip("imbsam._C was built without the CUDA kernels")
    return found


def test_every_multi_tensor_kernel_uses_16_byte_accesses(kernels):
    assert {kind for kind, _, _ in kernels.values()} == {"SumSquares", "Perturb", "Copy", "Add", "Sgd"}
    for name, (kind, storage, code) in kernels.items():
        assert "LDG.E.128" in code, (kind, name)
        # fp64 values may leave as two 8-byte stores; every list of 4-byte or smaller
        # elements is written 16 bytes at a time (the norm writes no list).
        if kind != "SumSquares" and storage != "double":
            assert "STG.E.128" in code, (kind, name)
