"""Builds imbsam._C: the CPU kernels always, the CUDA kernels when the toolkit is there.

Environment switches:
  IMBSAM_BUILD_CUDA=0   skip the CUDA kernels (fast local loops); =1 require them.
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default: the visible GPUs', else
                        RELEASE_ARCHS below; scripts/quickstart.sh builds 9.0+PTX alone
                        on a machine without a GPU, which is all its tests read).
  MAX_JOBS              parallel compile jobs (ninja); defaults to the core count.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home() -> str | None:
    # torch looks at CUDA_HOME, nvcc on PATH and /usr/local/cuda; toolkits installed as
    # /usr/local/cuda-13.0 without the symlink are found here before torch looks.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
    return os.path.dirname(os.path.dirname(candidates[0])) if candidates else None


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ.setdefault("CUDA_HOME", cuda_home)

try:
    import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it on import)
except ImportError:  # an isolated build environment: it cannot hold the torch imbsam runs with
    sys.exit("imbsam compiles against the installed torch, but torch does not import in this build "
             "environment. Install torch first, then: pip install --no-build-isolation [-e] .")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    switch = os.environ.get("IMBSAM_BUILD_CUDA", "auto").lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if switch in ("0", "false", "no", "off"):
        return False
    if switch in ("1", "true", "yes", "on"):
        if not possible:
            sys.exit(
                "IMBSAM_BUILD_CUDA=1 but the CUDA build is impossible: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
                "Install a CUDA build of torch and the CUDA toolkit (nvcc), or set IMBSAM_BUILD_CUDA=0."
            )
        return True
    if switch != "auto":
        sys.exit(f"IMBSAM_BUILD_CUDA={switch!r}: use 0, 1 or auto")
    return possible


# A release build carries machine code for each GPU generation the toolkit supports from
# Volta on (data-centre and consumer parts alike), plus PTX of the newest for GPUs after it.
RELEASE_ARCHS = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def _toolkit_archs() -> set[str]:
    """The compute capabilities this nvcc can compile for ("7.5", "9.0", ...)."""
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    found = set()
    for name in out.split():
        digits = name.rpartition("_")[2].rstrip("af")
        if digits.isdigit():
            found.add(f"{digits[:-1]}.{digits[-1]}")
    return found


def _default_arch_list() -> str:
    # With GPUs visible, their own architectures only (a local build, fast). Without, the
    # release set: a build machine without a GPU must not produce a library that fails
    # with "no kernel image" on an A100, L40 or RTX 4090. (CI builds one explicit arch.)
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    supported = _toolkit_archs()
    archs = [a for a in RELEASE_ARCHS if a in supported] or ["9.0"]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _has_pre_volta(arch_list: str) -> bool:
    # Kernel arguments beyond 4 KiB need compute capability 7.0 (and CUDA 12.1).
    for arch in arch_list.replace(";", " ").replace(",", " ").split():
        name = arch.split("+")[0]
        if name in ("Kepler", "Maxwell", "Pascal"):
            return True
        try:
            if float(name) < 7.0:
                return True
        except ValueError:
            pass
    return False


def extensions():
    # No -std flag: torch picks the standard its headers need (C++17 with torch 2.4 and 2.11,
    # C++20 with 2.14, as the builds against those versions show).
    # -ffp-contract=off: no fused multiply-adds, so fp32 results match the reference bit for bit.
    # -Wno-psabi: GCC notes that 32-byte vector values change the ABI without AVX; they only
    # pass between inline lambdas of one translation unit, never across a library boundary.
    # -fno-math-errno: sqrt need not set errno, so Adam's loop vectorises (with errno GCC
    # keeps a scalar call beside each sqrt); results are the same IEEE roots.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    common = dict(
        name="imbsam._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        # The OpenMP pragmas in at::parallel_for are inline: without -fopenmp they run on one thread.
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # --fmad=false: no fused multiply-adds in device code (-ffp-contract=off reaches only
        # the host compiler), so the GPU rounds w + scale * g like the reference; the
        # kernels are memory-bound, so the separate multiply and add cost nothing.
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]
        if _has_pre_volta(os.environ["TORCH_CUDA_ARCH_LIST"]):
            nvcc_flags.append("-DIMBSAM_MTA_LARGE_ARGS=0")
        print(f"imbsam: building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        return [CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **common)]
    print("imbsam: building CPU kernels only (no CUDA toolkit, a CPU-only torch, or IMBSAM_BUILD_CUDA=0)")
    return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)]


setup(
    name="imbsam",
    version="0.1.0",
    description="Fused SAM / ASAM / ImbSAM optimizers for PyTorch with CPU, CUDA and Triton kernels",
    packages=find_packages(include=["imbsam", "imbsam.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    # The optimizers need torch alone; the training pipeline (python -m imbsam.train, the
    # ResNet-34 model, downloads, progress bars, plots) these too.
    extras_require={"train": ["torchvision", "tqdm", "matplotlib"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
