"""imbsam as users install it: an sdist that holds everything setup.py compiles, a wheel
built from that sdist (CPU kernels) that installs into a fresh virtual environment outside
the checkout and steps as the editable install does, and a build without a working
compiler or with a CUDA toolkit that does not match torch's that says so in one message.

The fresh environment sees torch through a .pth line to this environment's site-packages
(installing torch again would copy gigabytes); imbsam itself comes from the wheel only.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("build") is None,
                                reason="needs the build package (requirements.txt)")


def setup_module_checks():
    """setup.py's checks, imported (its setup() runs only as __main__, as pip runs it)."""
    spec = importlib.util.spec_from_file_location("imbsam_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources_and_their_headers() -> set[str]:
    """What setup.py compiles (csrc/ops.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cu) and every header
    those include from csrc/, transitively: the files an sdist must hold to build."""
    todo = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT)),
            *sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))]
    seen = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        with open(os.path.join(ROOT, path)) as f:
            for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read(), flags=re.M):
                for base in (os.path.dirname(path), "csrc"):  # beside the file, then the include dir
                    candidate = os.path.normpath(os.path.join(base, name))
                    if os.path.isfile(os.path.join(ROOT, candidate)):
                        todo.append(candidate)
                        break
    return seen


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """``python -m build``: the sdist, then a wheel built from it (CPU kernels only)."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, IMBSAM_BUILD_CUDA="0")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), ROOT],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sdist, = glob.glob(str(out / "imbsam-*.tar.gz"))
    wheel, = glob.glob(str(out / "imbsam-*.whl"))
    return sdist, wheel, out


def test_the_sdist_holds_every_source_and_header_the_build_reads(dist):
    with tarfile.open(dist[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = sorted(sources_and_their_headers() - names)
    assert not missing, f"the sdist lacks {missing}"
    assert {"setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"} <= names


def test_the_wheel_carries_the_compiled_library_and_the_metadata_of_a_package(dist):
    with zipfile.ZipFile(dist[1]) as whl:
        names = whl.namelist()
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(re.fullmatch(r"imbsam/_C\..*\.so", n) for n in names)
    assert not any(n.startswith(("tests/", "csrc/", "benchmarks/")) for n in names)
    for field in ("Name: imbsam", "Version: 0.1.0", "Requires-Python: >=3.9", "Requires-Dist: torch>=2.4",
                  "Description-Content-Type: text/markdown", "Classifier: Programming Language :: C++"):
        assert field in meta, field
    assert re.search(r"^License(-Expression)?: MIT$", meta, flags=re.M)  # the field depends on setuptools
    assert any(n.endswith("dist-info/licenses/LICENSE") or n.endswith("dist-info/LICENSE") for n in names)


def fresh_venv(path) -> str:
    """A new virtual environment that sees this one's torch (and nothing of imbsam)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=300)
    python = os.path.join(path, "bin", "python")
    its_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    torch_site = os.path.dirname(os.path.dirname(importlib.util.find_spec("torch").origin))
    with open(os.path.join(its_site, "torch_from_the_test_env.pth"), "w") as f:
        f.write(torch_site + "\n")  # a path line: the editable imbsam's own .pth there is not run
    return python


# One SAM and one ImbSAM step on each backend, printed as the weights' sums (run by both installs).
STEPS = r"""
import json, torch, imbsam
out = {"file": imbsam.__file__, "backends": imbsam.available_backends()}
for backend in ("cpp", "reference"):
    for cls in (imbsam.SAM, imbsam.ImbSAM):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        opt = cls(model.parameters(), torch.optim.SGD, rho=0.1, backend=backend, lr=0.1, momentum=0.9)
        split = imbsam.HeadTailLoss([400, 300, 200, 5])
        x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
        if cls is imbsam.ImbSAM:
            opt.step(lambda: split(model(x), y))
        else:
            def closure():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        out[f"{cls.__name__} {backend}"] = [p.detach().double().sum().item() for p in model.parameters()]
print(json.dumps(out))
"""


def run_steps(python, cwd) -> dict:
    done = subprocess.run([python, "-c", STEPS], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_wheel_installs_outside_the_checkout_and_steps_as_the_editable_install(dist, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                           "-q", dist[1]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = run_steps(python, str(tmp_path))
    assert installed["file"].startswith(str(tmp_path / "venv")), installed["file"]  # not the checkout's
    assert {"reference", "cpp"} <= set(installed["backends"])
    editable = run_steps(sys.executable, ROOT)
    for key in editable:
        if key not in ("file", "backends"):
            assert installed[key] == editable[key], key


def unpack(sdist: str, into) -> str:
    with tarfile.open(sdist) as tar:
        # filter="data" (no links out, no devices) where this Python has it (3.11.4 on).
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked, = glob.glob(str(into / "imbsam-*"))
    return unpacked


def test_without_a_compiler_the_build_stops_with_one_message_naming_the_switch(dist, tmp_path):
    unpacked = unpack(dist[0], tmp_path)
    env = dict(os.environ, CXX="false", IMBSAM_BUILD_CUDA="0")
    done = subprocess.run([sys.executable, "setup.py", "build_ext"], cwd=unpacked, capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode != 0
    said = done.stderr.strip().splitlines()
    assert said[-1].startswith("imbsam: the C++ compiler 'false' cannot build a C++17 program with OpenMP")
    assert "IMBSAM_BUILD_EXT=0" in said[-1] and len(said) < 10
    assert not glob.glob(os.path.join(unpacked, "build", "**", "*.o"), recursive=True)  # nothing was compiled


def test_with_imbsam_build_ext_0_the_package_installs_with_the_python_backends(dist, tmp_path):
    unpacked = unpack(dist[0], tmp_path)
    env = dict(os.environ, CXX="false", IMBSAM_BUILD_EXT="0")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "wheel"), unpacked], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    python = fresh_venv(tmp_path / "venv")
    wheel, = glob.glob(str(tmp_path / "wheel" / "imbsam-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
                    wheel], check=True, capture_output=True, timeout=600)
    done = subprocess.run([python, "-c", "import imbsam; print(imbsam.available_backends())"], capture_output=True,
                          text=True, cwd=str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'reference'" in done.stdout and "'cpp'" not in done.stdout


def test_a_cuda_toolkit_that_does_not_match_torch_is_named_before_any_compile(tmp_path, capsys):
    checks = setup_module_checks()
    nvcc = tmp_path / "cuda-11.8" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 11.8, V11.8.89'\n")
    nvcc.chmod(0o755)
    problem = checks.cuda_build_problem("13.0", str(tmp_path / "cuda-11.8"))
    assert "is 11.8, but this torch was built with CUDA 13.0: their major versions must match" in problem
    assert checks.want_cuda("auto", problem) is False  # auto: the CPU kernels, said once
    assert "not building the CUDA kernels" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="IMBSAM_BUILD_CUDA=1, but the CUDA kernels cannot be built.*"
                                         "IMBSAM_BUILD_CUDA=0"):
        checks.want_cuda("1", problem)
    assert checks.cuda_build_problem("13.0", None).startswith("no CUDA toolkit was found")
    assert checks.cuda_build_problem(None, "/usr/local/cuda").startswith("this torch is a CPU-only build")
    if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
        import torch

        home = checks.CUDA_HOME
        if torch.version.cuda and home and checks.nvcc_version(home):
            matching = checks.nvcc_version(home).split(".")[0] == torch.version.cuda.split(".")[0]
            assert (checks.cuda_build_problem(torch.version.cuda, home) is None) == matching


def test_a_compiler_that_fails_is_named_with_its_first_error_line(tmp_path):
    checks = setup_module_checks()
    noisy = tmp_path / "noisy-c++"
    noisy.write_text("#!/bin/sh\nfor i in $(seq 300); do echo \"error $i: no\" >&2; done\nexit 1\n")
    noisy.chmod(0o755)
    problem = checks.compiler_problem(str(noisy))
    assert problem.endswith("cannot build a C++17 program with OpenMP: error 1: no")
    assert checks.compiler_problem(str(tmp_path / "absent")).startswith("the C++ compiler")
    assert checks.compiler_problem(os.environ.get("CXX", "c++")) is None  # this machine's works
