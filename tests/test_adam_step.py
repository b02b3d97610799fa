"""restore_adam_step_ on every backend against torch.optim.Adam / AdamW themselves: the
op restores w from its backup, combines g (+ g_H), and takes the step torch would take
from the restored w with that gradient and that state. Also the skip flag, a tensor lr,
empty and long lists, misaligned views, bad input, opcheck, and the CUDA kernel through
the emulator (bit for bit with the CPU kernel: both run csrc/adam_math.h)."""
from __future__ import annotations

import functools
import os

import pytest
import torch

import imbsam
from imbsam.backends import reference

import emulated_cuda
from conftest import COMPILES_MUTABLE_LISTS, DTYPES, SIZES, assert_close_to_exact, fast_backend, max_err

HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
CASES = {  # (decoupled weight decay, weight decay, amsgrad, maximize)
    "adam": (False, 0.05, False, False),
    "adamw": (True, 0.05, False, False),
    "adam-amsgrad-maximize": (False, 0.01, True, True),
    "adamw-amsgrad": (True, 0.1, True, False),
    "adamw-no-decay": (True, 0.0, False, False),
}


def tol_dtype(backend, dtype):
    # Triton passes Python floats as fp32: fp64 parameters see fp32-rounded hyperparameters.
    return torch.float32 if backend == "triton" and dtype == torch.float64 else dtype


def make(sizes, dtype, seed, kind="normal", scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, generator=gen, dtype=torch.float64) if kind == "normal" else torch.rand(
            n, generator=gen, dtype=torch.float64)
        out.append((x * scale).to(dtype))
    return out


class Inputs:
    """One step's inputs: perturbed weights, backups, g, g_H, and an Adam state some steps in."""

    def __init__(self, sizes, dtype, seed, head, amsgrad, first_step=False):
        self.w, self.b, self.g = (make(sizes, dtype, seed + i) for i in range(3))
        self.h = make(sizes, dtype, seed + 3) if head else []
        zeros = lambda: [torch.zeros(n, dtype=dtype) for n in sizes]  # noqa: E731
        self.m = zeros() if first_step else make(sizes, dtype, seed + 4, scale=0.1)
        self.v = zeros() if first_step else make(sizes, dtype, seed + 5, "uniform", 0.1)
        self.vmax = (zeros() if first_step else make(sizes, dtype, seed + 6, "uniform", 0.1)) if amsgrad else []
        self.steps = [torch.tensor(0.0 if first_step else 3.0 + i % 2) for i in range(len(sizes))]

    def copy(self, dtype=None, device="cpu"):
        c = Inputs.__new__(Inputs)
        for k, v in vars(self).items():
            c.__dict__[k] = [t.to(dtype=t.dtype if dtype is None or k == "steps" else dtype, device=device).clone()
                             for t in v]
        return c

    def run(self, ops, case, **scalars):
        decoupled, wd, amsgrad, maximize = CASES[case]
        ops.restore_adam_step_(self.w, self.g, self.b, self.h, self.m, self.v, self.vmax, self.steps, HYPER["lr"],
                               HYPER["beta1"], HYPER["beta2"], HYPER["eps"], wd, decoupled, amsgrad, maximize,
                               **scalars)
        return self

    def results(self):
        return self.w + self.m + self.v + self.vmax


def torch_step(x: Inputs, case) -> Inputs:
    """The same step taken by torch.optim.Adam / AdamW on the restored weights, with d = g + g_H
    summed in the math dtype (as the op does): foreach=False for fp32/fp64, fused=True for
    bf16/fp16 (torch's fp32-math path, the semantics the op promises for them)."""
    decoupled, wd, amsgrad, maximize = CASES[case]
    low = x.w[0].dtype in (torch.bfloat16, torch.float16)
    out = x.copy()
    for i, b in enumerate(x.b):
        p = torch.nn.Parameter(b.clone())
        d = x.g[i].float() if low else x.g[i]
        if x.h:
            d = d + (x.h[i].float() if low else x.h[i])
        p.grad = d.to(b.dtype)
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt = cls([p], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"], weight_decay=wd,
                  amsgrad=amsgrad, maximize=maximize, **(dict(fused=True) if low else dict(foreach=False)))
        opt.state[p] = {"step": x.steps[i].clone(), "exp_avg": x.m[i].clone(), "exp_avg_sq": x.v[i].clone(),
                        **({"max_exp_avg_sq": x.vmax[i].clone()} if amsgrad else {})}
        opt.step()
        s = opt.state[p]
        out.w[i], out.m[i], out.v[i], out.steps[i] = p.detach(), s["exp_avg"], s["exp_avg_sq"], s["step"]
        if amsgrad:
            out.vmax[i] = s["max_exp_avg_sq"]
    return out


def backend_params():
    # The reference too: it is the spec, and it must agree with torch as the others do.
    return [pytest.param("reference", "cpu", id="reference-cpu"), *fast_backend.args[1]]


@pytest.fixture
def ops(backend):
    return imbsam.backends.ops_for(backend)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("head", [False, True], ids=["sam", "imbsam"])
def test_matches_torch_adam(backend, device, ops, dtype, case, head):
    amsgrad = CASES[case][2]
    x = Inputs(SIZES, dtype, 10, head, amsgrad)
    fast = x.copy(device=device).run(ops, case)
    same = torch_step(x, case)
    exact = torch_step(x.copy(torch.float64), case)
    # The fp64 truth's gradient is the sum of the same stored g and g_H.
    assert_close_to_exact([t.cpu() for t in fast.results()], same.results(), exact.results(), tol_dtype(backend, dtype))
    assert [s.item() for s in fast.steps] == [s.item() for s in same.steps]
    assert all(s.dtype == torch.float32 and s.device.type == device for s in fast.steps)  # where they were


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", ["adamw", "adam-amsgrad-maximize"])
def test_first_step_from_zero_state(backend, device, ops, case):
    x = Inputs([7, 65537], torch.float32, 20, True, CASES[case][2], first_step=True)
    fast, same = x.copy(device=device).run(ops, case), torch_step(x, case)
    assert max_err([t.cpu() for t in fast.results()], same.results()) <= 4 * torch.finfo(torch.float32).eps * 4
    assert [s.item() for s in fast.steps] == [1.0, 1.0]


@fast_backend
def test_found_inf_skips_and_a_tensor_lr_is_the_float_lr(backend, device, ops):
    x = Inputs([7, 65537], torch.float32, 30, True, True).copy(device=device)
    skipped = x.copy(device=device).run(ops, "adamw-amsgrad", found_inf=torch.ones((), device=device))
    assert all(torch.equal(w, b) for w, b in zip(skipped.w, x.b)), "a skipped step still restores"
    for name in ("m", "v", "vmax", "steps"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(skipped, name), getattr(x, name))), name
    nan = x.copy(device=device).run(ops, "adamw-amsgrad", found_inf=torch.tensor(float("nan"), device=device))
    assert all(torch.equal(a, b) for a, b in zip(nan.steps + nan.m, x.steps + x.m)), "NaN skips too"
    plain = x.copy(device=device).run(ops, "adamw-amsgrad")
    flagged = x.copy(device=device).run(ops, "adamw-amsgrad", found_inf=torch.zeros((), device=device),
                                         lr_tensor=torch.tensor(HYPER["lr"], device=device))
    # float32(lr) in the tensor: the decay 1 - lr * wd may round differently from the double lr.
    assert max_err(flagged.results(), plain.results()) <= 2 * torch.finfo(torch.float32).eps * 4
    assert [s.item() for s in flagged.steps] == [s.item() + 1 for s in x.steps]


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_and_long_lists(backend, device, ops):
    ops.restore_adam_step_([], [], [], [], [], [], [], [], 0.1, 0.9, 0.999, 1e-8, 0.0, True, False, False)
    sizes = [(i * 37) % 1000 for i in range(333)]  # empties, and more tensors than one CUDA launch holds
    x = Inputs(sizes, torch.float32, 40, True, True)
    fast, same = x.copy(device=device).run(ops, "adamw-amsgrad"), torch_step(x, "adamw-amsgrad")
    assert max_err([t.cpu() for t in fast.results()], same.results()) <= 4 * torch.finfo(torch.float32).eps * 4
    assert [s.item() for s in fast.steps] == [s.item() for s in same.steps]


def _views(values, device, misalign):
    out = []
    for v, off in zip(values, misalign):
        buf = torch.zeros(v.numel() + 1, dtype=v.dtype, device=device)
        out.append(buf[int(off):int(off) + v.numel()])
        out[-1].copy_(v)
    return out


@fast_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_tensors_beside_aligned_ones(backend, device, ops, dtype):
    sizes = [65537, 7, 278011, 1000]
    misalign = [False, True, False, True]
    x = Inputs(sizes, dtype, 50, True, True)
    fast = x.copy(device=device)
    for name in ("w", "g", "b", "h", "m", "v", "vmax"):
        setattr(fast, name, _views(getattr(x, name), device, misalign if name != "m" else [not m for m in misalign]))
    fast.run(ops, "adamw-amsgrad")
    ref = x.copy().run(reference, "adamw-amsgrad")
    tol = 4 * torch.finfo(dtype).eps * 4
    assert max_err([t.cpu() for t in fast.results()], ref.results()) <= tol


@pytest.mark.parametrize("backend,device", backend_params())
def test_bad_input_is_refused_before_anything_is_written(backend, device, ops):
    x = Inputs([7, 300], torch.float32, 60, False, True).copy(device=device)
    before = x.copy(device=device)
    args = lambda **kw: dict(dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,  # noqa: E731
                                  decoupled_weight_decay=True, amsgrad=True, maximize=False), **kw)
    bad = [
        (lambda: ops.restore_adam_step_(x.w, x.g, x.b, [], x.m, x.v, x.vmax, x.steps[:1], **args()), "state_steps"),
        (lambda: ops.restore_adam_step_(x.w, x.g, x.b, [], x.m, x.v, x.vmax,
                                        [x.steps[0], torch.tensor(1)], **args()), "float32 or float64"),
        (lambda: ops.restore_adam_step_(x.w, x.g, x.b, [], x.m, x.v, x.vmax,
                                        [x.steps[0], torch.zeros(2)], **args()), "one float32"),
        (lambda: ops.restore_adam_step_(x.w, x.g, x.b, [], x.m, x.v, x.vmax, x.steps, **args(amsgrad=False)),
         "amsgrad is off"),
        (lambda: ops.restore_adam_step_(x.w, x.g, x.b, [], x.m, x.v[:1], x.vmax, x.steps, **args()), "exp_avg_sqs"),
        (lambda: ops.restore_adam_step_(x.w, x.g, x.b, [], [x.m[0], x.m[1][:5]], x.v, x.vmax, x.steps, **args()),
         "exp_avgs"),
        (lambda: ops.restore_adam_step_(x.w, x.g, x.b, [], x.m, x.v, [x.vmax[0], x.vmax[1].double()], x.steps,
                                        **args()), "max_exp_avg_sqs"),
    ]
    for call, words in bad:
        with pytest.raises((ValueError, TypeError), match=words):
            call()
        for name in ("w", "m", "v", "vmax", "steps"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(x, name), getattr(before, name))), (words, name)


@fast_backend
def test_opcheck(backend, device):
    utils = None if COMPILES_MUTABLE_LISTS else ("test_schema", "test_autograd_registration", "test_faketensor")
    opcheck = functools.partial(torch.library.opcheck, **({"test_utils": utils} if utils else {}))
    op = getattr(torch.ops.imbsam, ("triton_" if backend == "triton" else "") + "restore_adam_step_").default
    x = Inputs([7, 300], torch.float32, 70, True, True).copy(device=device)
    opcheck(op, (x.w, x.g, x.b, x.h, x.m, x.v, x.vmax, x.steps, 0.1, 0.9, 0.999, 1e-8, 0.01, True, True, False),
            dict(lr_tensor=torch.tensor(0.1, device=device), found_inf=torch.zeros((), device=device)))


# ---- the CUDA kernel, executed by the emulator ----------------------------------------------

needs_emulator = pytest.mark.skipif(emulated_cuda.compiler() is None and not os.environ.get("CI"),
                                    reason="the CUDA emulator needs clang++ (apt-get install clang); CI requires it")
needs_cpp = pytest.mark.skipif("cpp" not in imbsam.available_backends(), reason="compares with the cpp kernel")


@needs_emulator
@needs_cpp
@pytest.mark.parametrize("large", [False, True], ids=["4K", "32K"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("head", [False, True], ids=["sam", "imbsam"])
def test_emulated_cuda_kernel_is_the_cpu_kernel_bit_for_bit(large, dtype, case, head):
    emu = emulated_cuda.kernels(large)
    emu.configure("random", seed=5)
    # Tensors off 16-byte alignment take the scalar path: one view a element in.
    x = Inputs(SIZES, dtype, 80, head, CASES[case][2])
    on_emu = x.copy()
    on_emu.w = _views(x.w, "cpu", [i % 2 for i in range(len(SIZES))])
    on_emu.run(emu, case)
    on_cpu = x.copy().run(imbsam.backends.ops_for("cpp"), case)
    assert all(torch.equal(a, b) for a, b in zip(on_emu.steps, on_cpu.steps))
    if dtype == torch.float64:
        # The bias corrections come from torch.pow on the device and std::pow on the host:
        # they may differ in the last bit of a double, which fp64 math shows and fp32 hides.
        assert max_err(on_emu.results(), on_cpu.results()) <= 8 * torch.finfo(torch.float64).eps * 4
    else:
        assert all(torch.equal(a, b) for a, b in zip(on_emu.results(), on_cpu.results()))


@needs_emulator
@needs_cpp
def test_emulated_cuda_kernel_with_300_tensors_a_tensor_lr_and_found_inf():
    emu = emulated_cuda.kernels(False)
    emu.configure("reverse")
    sizes = [(i * 7919) % 3001 for i in range(330)]
    x = Inputs(sizes, torch.float32, 90, True, True)
    before = emu.launches()
    lr = dict(lr_tensor=torch.tensor(0.003))
    on_emu = x.copy().run(emu, "adamw-amsgrad", found_inf=torch.zeros(()), **lr)
    assert emu.launches() - before >= 330 // 20  # 8 columns: 20 tensors a 4 KiB launch
    on_cpu = x.copy().run(imbsam.backends.ops_for("cpp"), "adamw-amsgrad", **lr)
    assert all(torch.equal(a, b) for a, b in zip(on_emu.results() + on_emu.steps, on_cpu.results() + on_cpu.steps))
    skipped = x.copy().run(emu, "adamw-amsgrad", found_inf=torch.ones(()), **lr)
    assert all(torch.equal(a, b) for a, b in zip(skipped.w + skipped.m + skipped.steps, x.b + x.m + x.steps))



# Several 64 Ki-element chunks with odd tails, a chunk and one element, and a short tensor:
# a flag or a NaN must reach every chunk of a tensor, not only its first.
MULTI_CHUNK = [3 * 65536 + 11, 65537, 5]


@needs_emulator
@needs_cpp
@pytest.mark.parametrize("large", [False, True], ids=["4K", "32K"])
@pytest.mark.parametrize("flag", [0.0, 1.0, float("nan"), float("inf")], ids=["0", "1", "nan", "inf"])
def test_emulated_skip_flag_of_every_value_on_multi_chunk_tensors(large, flag):
    """Nonzero or NaN skips: the weights restored and m, v, vmax and the step counts as they
    were, in every chunk; 0 takes the CPU kernel's step bit for bit."""
    emu = emulated_cuda.kernels(large)
    emu.configure("random", seed=7)
    x = Inputs(MULTI_CHUNK, torch.float32, 100, True, True)
    on_emu = x.copy().run(emu, "adamw-amsgrad", found_inf=torch.tensor(flag))
    if flag == 0:
        on_cpu = x.copy().run(imbsam.backends.ops_for("cpp"), "adamw-amsgrad", found_inf=torch.tensor(flag))
        assert all(torch.equal(a, b) for a, b in zip(on_emu.results() + on_emu.steps, on_cpu.results() + on_cpu.steps))
        assert not torch.equal(on_emu.w[0], x.b[0])
    else:
        expected = x.b + x.m + x.v + x.vmax + x.steps
        assert all(torch.equal(a, b) for a, b in zip(on_emu.w + on_emu.m + on_emu.v + on_emu.vmax + on_emu.steps,
                                                      expected))


@needs_emulator
@needs_cpp
@pytest.mark.parametrize("large", [False, True], ids=["4K", "32K"])
@pytest.mark.parametrize("where", ["backups", "g", "h", "m", "v", "vmax"])
def test_emulated_nan_in_each_input_of_the_adam_math_propagates_as_the_reference_says(large, where):
    """A NaN in any input, in a later chunk of a tensor too, comes out where the reference (the
    spec: torch's operations, amsgrad's max keeping a NaN) puts one, and the CUDA kernel
    equals the CPU kernel (NaN for NaN)."""
    emu = emulated_cuda.kernels(large)
    emu.configure("reverse")
    x = Inputs(MULTI_CHUNK, torch.float32, 110, True, True)
    target = {"backups": x.b, "g": x.g, "h": x.h, "m": x.m, "v": x.v, "vmax": x.vmax}[where]
    for t, spots in zip(target, ([3, 65536 + 7, 2 * 65536 + 9], [65536], [4])):
        t[spots] = float("nan")
    on_emu = x.copy().run(emu, "adamw-amsgrad")
    on_cpu = x.copy().run(imbsam.backends.ops_for("cpp"), "adamw-amsgrad")
    spec = x.copy().run(reference, "adamw-amsgrad")
    for a, b, r in zip(on_emu.results(), on_cpu.results(), spec.results()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(a.isnan(), r.isnan())
    assert any(t.isnan().any() for t in on_emu.results())


@pytest.mark.skipif("cpp" not in imbsam.available_backends(), reason="needs imbsam._C")
def test_the_agreement_docs_semantics_quotes_holds(tmp_path):
    """scripts/adam_agreement.py, whose committed numbers docs/semantics.md quotes: most fp32
    weights bitwise equal to torch's step, and no larger error against float64 than torch's."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("adam_agreement", os.path.join(root, "scripts", "adam_agreement.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for row in script.main(["--out", str(tmp_path / "agreement.json")])["rows"]:
        assert row["share_bitwise_equal"] > 0.99, row
        assert row["max_abs_err_fused_vs_fp64"] <= 1.01 * row["max_abs_err_torch_vs_fp64"], row
