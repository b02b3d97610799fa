"""The machine code of the built CUDA kernels (read with cuobjdump, no GPU needed): every
multi-tensor kernel moves its lists with 16-byte loads and stores on the aligned path
(a split access runs, but costs instructions and bandwidth; nvcc split restore's source
load into four 4-byte ones once, which this test would have caught); no kernel fuses a
multiply and an add (the reference rounds each: setup.py's --fmad=false); and both
kernel-argument layouts are compiled (the glue picks one per GPU at run time)."""
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


def dump(kind: str) -> str:
    """cuobjdump -sass or -ptx of the built library."""
    tool = cuobjdump()
    library = glob.glob(os.path.join(os.path.dirname(imbsam.__file__), "_C*.so"))
    if tool is None or not library:
        pytest.skip("needs cuobjdump and the built imbsam._C")
    return subprocess.run([tool, f"-{kind}", library[0]], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def kernels():
    sass = dump("sass")
    found = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0]
        match = re.search(r"(SumSquares|Perturb|Copy|Add|Sgd)Functor", name)
        if match and "multi_tensor_kernel" in name:
            storage = "double" if re.search(r"Functor(I|Ii?)d", name) else "other"
            found[name] = (match.group(1), storage, chunk.split("\n..........")[0])
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


def test_both_kernel_argument_layouts_are_compiled(kernels):
    for kind in ("SumSquares", "Perturb", "Copy", "Add", "Sgd"):
        layouts = {re.search(r"multi_tensor_kernelILi\dELb([01])E", name).group(1)
                   for name, (k, _, _) in kernels.items() if k == kind}
        assert layouts == {"0", "1"}, (kind, layouts)  # 4 KiB and 32 KiB metadata


def test_no_kernel_fuses_a_multiply_and_an_add(kernels):
    # In the machine code: none in the kernels without a division (perturb's fp64
    # rho / (norm + eps) expands into an FMA-based routine, which rounds correctly).
    for name, (kind, _, code) in kernels.items():
        if kind != "Perturb":
            assert not re.search(r"\b[DF]FMA\b", code), (kind, name)
    # In the PTX (where the division is still one div.rn.f64): no fma at all.
    ptx = dump("ptx")
    entries = re.split(r"\.entry ", ptx)[1:]
    if not entries:
        pytest.skip("the library holds no PTX (built without +PTX)")
    fused = [e.split("(", 1)[0] for e in entries if re.search(r"\bfma\.rn\.f(32|64)\b", e)]
    assert not fused, fused[:3]
