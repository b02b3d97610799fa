"""The machine code of the built CUDA kernels (read with cuobjdump, no GPU needed): every
multi-tensor kernel (Adam's 64 included) moves its lists with 16-byte loads and stores on
the aligned path (a split access runs, but costs instructions and bandwidth; nvcc split
restore's source load into four 4-byte ones once, which this test would have caught); no
kernel fuses a multiply and an add (the reference rounds each: setup.py's --fmad=false);
and both kernel-argument layouts are compiled (the glue picks one per GPU at run time).
Without cuobjdump, or with one that fails, these tests skip, and fail where ``CI`` is set."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

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


# Every functor the multi-tensor kernel is instantiated with: the update kernels and the norm.
FUNCTORS = ("SumSquares", "Perturb", "Copy", "Add", "Sgd", "Adam")
# Those whose update divides or takes a square root: their machine code holds the FMA-based
# routines of the correctly rounded division and square root (the PTX test covers them).
DIVIDING = ("Perturb", "Adam")


def unavailable(reason: str) -> None:
    """A skip on a developer's machine; in CI (``CI`` set) a failure: a check that silently
    stops running is worse than one that fails."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: this check must run)")
    pytest.skip(reason)


def dump(kind: str) -> str:
    """cuobjdump -sass or -ptx of the built library."""
    tool = cuobjdump()
    library = glob.glob(os.path.join(os.path.dirname(imbsam.__file__), "_C*.so"))
    if tool is None:
        unavailable("needs cuobjdump (the CUDA toolkit's, or the one inside the Triton wheel)")
    if not library:
        unavailable("needs the built imbsam._C")
    result = subprocess.run([tool, f"-{kind}", library[0]], capture_output=True, text=True)
    if result.returncode != 0:
        unavailable(f"{tool} -{kind} failed ({result.returncode}): {result.stderr.strip()[:300]}")
    return result.stdout


@pytest.fixture(scope="module")
def kernels():
    sass = dump("sass")
    found = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0]
        match = re.search(rf"({'|'.join(FUNCTORS)})Functor", name)
        if match and "multi_tensor_kernel" in name:
            storage = "double" if re.search(r"Functor(I|Ii?)d", name) else "other"
            found[name] = (match.group(1), storage, chunk.split("\n..........")[0])
    if not found:
        pytest.skip("imbsam._C was built without the CUDA kernels")
    return found


def test_every_multi_tensor_kernel_uses_16_byte_accesses(kernels):
    assert {kind for kind, _, _ in kernels.values()} == set(FUNCTORS)
    for name, (kind, storage, code) in kernels.items():
        assert "LDG.E.128" in code, (kind, name)
        # fp64 values may leave as two 8-byte stores; every list of 4-byte or smaller
        # elements is written 16 bytes at a time (the norm writes no list).
        if kind != "SumSquares" and storage != "double":
            assert "STG.E.128" in code, (kind, name)


def test_both_kernel_argument_layouts_are_compiled(kernels):
    for kind in FUNCTORS:
        layouts = {re.search(r"multi_tensor_kernelILi\dELb([01])E", name).group(1)
                   for name, (k, _, _) in kernels.items() if k == kind}
        assert layouts == {"0", "1"}, (kind, layouts)  # 4 KiB and 32 KiB metadata


def test_no_kernel_fuses_a_multiply_and_an_add(kernels):
    # In the machine code: none in the kernels without a division or square root (perturb's
    # fp64 rho / (norm + eps), Adam's division and sqrt expand into FMA-based routines, which
    # round correctly).
    for name, (kind, _, code) in kernels.items():
        if kind not in DIVIDING:
            assert not re.search(r"\b[DF]FMA\b", code), (kind, name)
    # In the PTX (where the division is still one div.rn.f64): no fma at all.
    ptx = dump("ptx")
    entries = re.split(r"\.entry ", ptx)[1:]
    if not entries:
        pytest.skip("the library holds no PTX (built without +PTX)")
    fused = [e.split("(", 1)[0] for e in entries if re.search(r"\bfma\.rn\.f(32|64)\b", e)]
    assert not fused, fused[:3]


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_or_broken_cuobjdump_skips_here_and_fails_in_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(sys.modules[__name__], "cuobjdump", lambda: shutil.which("false") or "/bin/false")
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception, match="failed"):
        dump("sass")
    monkeypatch.setattr(sys.modules[__name__], "cuobjdump", lambda: None)
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception, match="needs cuobjdump"):
        dump("sass")
