"""The Triton kernels compiled for a Hopper GPU (sm_90) on this machine, no GPU needed:
the interpreter runs them on the CPU, but only a real compile catches what the GPU
compiler rejects, and the PTX shows whether the aligned path moves 16 bytes per access.

The compile runs in a child process: the conftest turns Triton's interpreter on for this
one (no GPU here), and Triton built in that mode cannot compile for a GPU target.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from imbsam.backends.triton import tables

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPILE_ALL = r'''
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from imbsam.backends.triton import kernels as K

# The type of every non-constexpr kernel argument: address tables, scalars.
ARG_TYPES = dict(
    w_addrs="*i64", g_addrs="*i64", b_addrs="*i64", h_addrs="*i64", buf_addrs="*i64", dst_addrs="*i64",
    src_addrs="*i64", sizes="*i64", chunk_tensor="*i64", chunk_start="*i64", partials="*fp64", norm_ptr="*fp32",
    lr_ptr="*fp32", found_inf_ptr="*fp32", eta="fp32", rho="fp32", lr="fp32", momentum="fp32", dampening="fp32",
    weight_decay="fp32")
results = {}
for dtype_name in sys.argv[1:]:
    dtype = getattr(tl, dtype_name)
    common = dict(CHUNK=K.CHUNK, BLOCK=K.BLOCK, DTYPE=dtype)
    math = dict(MATH=tl.float64 if dtype_name == "float64" else tl.float32)
    # Each kernel with the options that take its longest path.
    for name, fn, constexprs in [
            ("sum_squares", K.sum_squares_kernel, dict(common, **math, ADAPTIVE=True)),
            ("perturb", K.perturb_kernel, dict(common, **math, ADAPTIVE=True)),
            ("copy", K.copy_kernel, common),
            ("add", K.add_kernel, dict(common, **math)),
            ("sgd", K.sgd_kernel, dict(common, **math, HAS_HEAD=True, HAS_MOMENTUM=True, FIRST=False,
                                       NESTEROV=True, MAXIMIZE=False, HAS_LR_PTR=True))]:
        for aligned in (False, True):
            c = dict(constexprs, ALIGNED=aligned)
            # The signature in the kernel's argument order: Triton reads it by position.
            sig = {a: "constexpr" if a in c else ARG_TYPES[a] for a in fn.arg_names}
            try:
                src = ASTSource(fn=fn, signature=sig, constexprs=c)
            except TypeError:  # older Triton (3.0 here): constants and the other arguments' types by position
                pos = {a: i for i, a in enumerate(fn.arg_names)}
                src = ASTSource(fn=fn, signature={pos[a]: t for a, t in sig.items() if t != "constexpr"},
                                constants={pos[a]: v for a, v in c.items()})
            # The options tables.launch passes: no fused multiply-adds.
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                 options=dict(enable_fp_fusion=False)).asm["ptx"]
            vector = re.search(r"(ld|st)\.global(\.[a-z0-9]+)*\.v[24]\.", ptx) is not None
            fused = re.search(r"\bfma\.rn\.f(32|64)\b", ptx) is not None
            results[f"{name}/{dtype_name}/{'aligned' if aligned else 'any'}"] = [vector, fused]
print(json.dumps(results))
'''

DTYPES = ["float32", "bfloat16", "float16", "float64"]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", COMPILE_ALL, *DTYPES], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0 and ("GPUTarget" in result.stderr or "ASTSource" in result.stderr) \
            and "ImportError" in result.stderr:
        pytest.skip("this Triton cannot compile for a GPU target without a GPU")
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_compiles_for_sm90_with_16_byte_accesses_only_when_aligned(compiled, dtype):
    for name in ("sum_squares", "perturb", "copy", "add", "sgd"):
        assert compiled[f"{name}/{dtype}/aligned"][0], (name, dtype)  # 16-byte loads and stores
        assert not compiled[f"{name}/{dtype}/any"][0], (name, dtype)  # none where alignment is unknown


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_kernel_fuses_a_multiply_and_an_add(compiled, dtype):
    for name in ("sum_squares", "perturb", "copy", "add", "sgd"):
        for access in ("aligned", "any"):
            assert not compiled[f"{name}/{dtype}/{access}"][1], (name, dtype, access)


def test_alignment_is_decided_per_tensor():
    base = torch.zeros(256)
    aligned = [base[:32], base[64:96]]  # 0 and 256 bytes in
    plan = tables.build_plan([[base[:32]], [base[32:64]]])  # 128 bytes in: aligned
    assert [tab.aligned for _, _, tab in plan] == [True]
    # One tensor 4 bytes in (a view into a bucket, say) takes the scalar path alone: the
    # others stay on the 16-byte path in a launch of their own.
    params = [aligned[0], base[129:161], aligned[1]]
    grads = [base[96:128], base[160:192], base[192:224]]
    plan = tables.build_plan([params, grads])
    assert sorted((tab.aligned, tab.n_chunks, len(tab.sizes)) for _, _, tab in plan) == [(False, 1, 1), (True, 2, 2)]
