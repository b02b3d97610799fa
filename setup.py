"""Builds imbsam._C: the CPU kernels always, the CUDA kernels when the toolkit is there.

Environment switches:
  IMBSAM_BUILD_CUDA=0   skip the CUDA kernels (fast local loops); =1 require them.
  IMBSAM_BUILD_EXT=0    no compiled library at all (no C++ compiler here): the package
                        installs with the reference and triton backends only.
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default: the visible GPUs', else
                        RELEASE_ARCHS below; scripts/quickstart.sh builds 9.0+PTX alone
                        on a machine without a GPU, which is all its tests read).
  MAX_JOBS              parallel compile jobs (ninja); defaults to the core count.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
import tempfile

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


def _switch(name: str) -> str:
    """An on/off/auto environment switch, as "0", "1" or "auto"."""
    value = os.environ.get(name, "auto").lower()
    for meaning, spellings in (("0", ("0", "false", "no", "off")), ("1", ("1", "true", "yes", "on")),
                               ("auto", ("auto", ""))):
        if value in spellings:
            return meaning
    sys.exit(f"{name}={value!r}: use 0, 1 or auto")


def nvcc_version(cuda_home: str | None) -> str | None:
    """The toolkit's release ("13.0"), from ``nvcc --version``; None if it cannot be run."""
    if cuda_home is None:
        return None
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_build_problem(torch_cuda: str | None, cuda_home: str | None) -> str | None:
    """Why the CUDA kernels cannot be built here, or None. torch refuses a toolkit whose
    major version differs from its own CUDA's, after a long compile log; said here first."""
    if torch_cuda is None:
        return "this torch is a CPU-only build (torch.version.cuda is None)"
    if cuda_home is None:
        return "no CUDA toolkit was found (nvcc in CUDA_HOME, on PATH or in /usr/local/cuda*)"
    found = nvcc_version(cuda_home)
    if found is None:
        return f"{os.path.join(cuda_home, 'bin', 'nvcc')} --version does not run or does not say its release"
    if found.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"the CUDA toolkit in {cuda_home} is {found}, but this torch was built with CUDA {torch_cuda}: "
                "their major versions must match")
    return None


def want_cuda(switch: str, problem: str | None) -> bool:
    """Whether to build the CUDA kernels, from IMBSAM_BUILD_CUDA and what stands in the way."""
    if switch == "0":
        return False
    if problem is None:
        return True
    if switch == "1":
        sys.exit(f"imbsam: IMBSAM_BUILD_CUDA=1, but the CUDA kernels cannot be built: {problem}. Install a "
                 "matching toolkit (CUDA_HOME=/usr/local/cuda-X.Y), or set IMBSAM_BUILD_CUDA=0 for the CPU kernels "
                 "(the triton backend still runs on GPUs).")
    print(f"imbsam: not building the CUDA kernels: {problem}. On a GPU the triton backend runs; for the cuda one, "
          "install a matching toolkit (CUDA_HOME=/usr/local/cuda-X.Y) and rebuild.")
    return False


def compiler_problem(cxx: str) -> str | None:
    """Why ``cxx`` cannot build imbsam._C's C++ (a C++17 program with OpenMP), or None."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\n#include <optional>\nint main() { std::optional<int> x = omp_get_max_threads();"
                    " return *x > 0 ? 0 : 1; }\n")
        try:
            done = subprocess.run([*shlex.split(cxx), "-std=c++17", "-fopenmp", src, "-o", os.path.join(tmp, "probe")],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"the C++ compiler {cxx!r} does not run ({exc})"
        if done.returncode != 0:
            first = next((line for line in (done.stderr or done.stdout).splitlines() if line.strip()), "no output")
            return f"the C++ compiler {cxx!r} cannot build a C++17 program with OpenMP: {first.strip()[:300]}"
    return None


class BuildImbsam(BuildExtension.with_options(use_ninja=True)):
    """torch's build, after one check of the C++ compiler: without one that works, one
    message and the switch that gets past it, not hundreds of lines of compiler errors."""

    def run(self):
        problem = compiler_problem(os.environ.get("CXX", "c++"))  # the compiler torch's ninja build uses
        if problem:
            sys.exit(f"imbsam: {problem}. imbsam._C needs a C++17 compiler with OpenMP (e.g. apt-get install g++). "
                     "To install without it, with the reference and triton backends only: IMBSAM_BUILD_EXT=0 pip "
                     "install --no-build-isolation .")
        super().run()


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
    if _switch("IMBSAM_BUILD_EXT") == "0":
        print("imbsam: IMBSAM_BUILD_EXT=0: no compiled library; the reference and triton backends only")
        return []
    if want_cuda(_switch("IMBSAM_BUILD_CUDA"), cuda_build_problem(torch.version.cuda, CUDA_HOME)):
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


def long_description() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import its checks
    setup(
        name="imbsam",
        version="0.1.0",
        description="Fused SAM / ASAM / ImbSAM optimizers for PyTorch with CPU, CUDA and Triton kernels",
        long_description=long_description(),
        long_description_content_type="text/markdown",
        license="MIT",
        license_files=["LICENSE"],
        classifiers=[
            "Development Status :: 3 - Alpha",
            "Intended Audience :: Science/Research",
            "Operating System :: POSIX :: Linux",
            "Programming Language :: C++",
            "Programming Language :: Python :: 3",
            "Programming Language :: Python :: 3 :: Only",
            "Environment :: GPU :: NVIDIA CUDA",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
        ],
        packages=find_packages(include=["imbsam", "imbsam.*"]),
        include_package_data=False,  # the package's files are its .py modules and imbsam._C
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
        # The optimizers need torch alone; the training pipeline (python -m imbsam.train, the
        # ResNet-34 model, downloads, progress bars, plots) these too.
        # The integrations (imbsam.integrations): from the versions CI tests (requirements.txt).
        extras_require={"train": ["torchvision", "tqdm", "matplotlib"], "lightning": ["lightning>=2.6"],
                        "timm": ["timm>=1.0.31"], "hf": ["transformers>=5.25", "accelerate>=1.16"]},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildImbsam},
    )
