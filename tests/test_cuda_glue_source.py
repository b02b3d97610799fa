"""The CUDA host glue (csrc/cuda/*.cu, *.cuh) read as source, for what no CPU test runs and a
wrong line would first show on a GPU, or only on a machine with two: every op registered
for CUDA sets its tensors' device (a CUDAGuard) before it allocates or launches, and every
launch goes on the current stream (the one torch's ops and a CUDA-graph capture use), never
the default one. The emulator runs the device code; this reads the host side around it."""
from __future__ import annotations

import pathlib
import re
import sys

import pytest

CUDA = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cuda"
REGISTRATION = re.compile(r'm\.impl\("(\w+)",\s*&(\w+)\)')
# What needs the right device set: launches, device allocations, and the glue's own helpers
# that do either (ATen ops on the device follow the current device too).
WORK = ("multi_tensor_apply<", "apply_to_addresses<", "<<<", "at::empty(", "launch_adam<", "increment_steps(",
        "bias_corrections(", "binary_apply<")


def sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted([*CUDA.glob("*.cu"), *CUDA.glob("*.cuh")])}


def functions(source: str) -> dict[str, str]:
    """Function name -> body (between its braces), for the definitions in ``source``."""
    found = {}
    for match in re.finditer(r"\b(\w+)\s*\([^;{}]*\)\s*(?:const\s*)?\{", source):
        name, depth, i = match.group(1), 1, match.end()
        if name in ("if", "for", "while", "switch", "catch"):
            continue
        while depth and i < len(source):
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            i += 1
        found.setdefault(name, source[match.end():i - 1])
    return found


def first_work(body: str) -> int:
    return min((i for i in (body.find(w) for w in WORK) if i >= 0), default=len(body))


def guarded_before_work(body: str, helpers: dict[str, str]) -> bool:
    guard = body.find("CUDAGuard")
    if guard >= 0:
        return guard < first_work(body)
    # No guard of its own: it may hand the tensors to a helper that sets the device first.
    calls = [(body.find(name + "<"), name) for name in helpers if name + "<" in body]
    return bool(calls) and min(calls)[0] <= first_work(body) and all(
        guarded_before_work(helpers[name], {}) for _, name in calls)


def test_every_op_registered_for_cuda_sets_its_device_before_it_works():
    every = {name: body for text in sources().values() for name, body in functions(text).items()}
    registered = [(file, op, fn) for file, text in sources().items() for op, fn in REGISTRATION.findall(text)]
    assert {op for _, op, _ in registered} >= {"grad_norm", "perturb_", "restore_", "add_head_grads_",
                                               "restore_sgd_step_", "restore_adam_step_"}
    for file, op, fn in registered:
        body = every[fn]
        helpers = {name: b for name, b in every.items() if "CUDAGuard" in b and name != fn}
        assert guarded_before_work(body, helpers), f"{file}: {op} ({fn}) works before a CUDAGuard sets the device"


def test_every_launch_goes_on_the_current_stream():
    launches = 0
    for file, text in sources().items():
        assert "getDefaultCUDAStream" not in text and "cudaStreamLegacy" not in text, file
        assert not re.search(r"\bcudaMemcpy\s*\(", text), f"{file}: a synchronous copy (cudaMemcpyAsync on the stream)"
        for name, body in functions(text).items():
            for config in re.findall(r"<<<([^>]*)>>>", body):
                launches += 1
                parts = [p.strip() for p in config.split(",")]
                assert len(parts) == 4 and parts[3] == "stream", f"{file}: {name} launches with <<<{config}>>>"
                assert re.search(r"\bstream\s*=\s*c10::cuda::getCurrentCUDAStream\(\)", body), \
                    f"{file}: {name}'s stream is not the current one"
    assert launches >= 3  # the multi-tensor kernel and the norm's two finalisations


@pytest.mark.parametrize("file,old,new", [
    ("updates.cu", "  const c10::cuda::CUDAGuard guard(params[0].device());\n  const DeviceScalar nrm",
     "  const DeviceScalar nrm"),
    ("multi_tensor_apply.cuh", "c10::cuda::getCurrentCUDAStream()", "c10::cuda::getDefaultCUDAStream()"),
    ("grad_norm.cu", "finalize_norm_kernel<<<1, 1024, 0, stream>>>(base, n_partials, out.data_ptr<float>())",
     "finalize_norm_kernel<<<1, 1024>>>(base, n_partials, out.data_ptr<float>())"),
])
def test_the_checks_catch_a_missing_guard_or_another_stream(monkeypatch, file, old, new):
    """Each planted glue bug fails one of the checks above."""
    real = sources()
    assert real[file].count(old) == 1
    monkeypatch.setattr(sys.modules[__name__], "sources", lambda: {**real, file: real[file].replace(old, new)})
    failures = 0
    for check in (test_every_op_registered_for_cuda_sets_its_device_before_it_works,
                  test_every_launch_goes_on_the_current_stream):
        try:
            check()
        except AssertionError:
            failures += 1
    assert failures == 1
