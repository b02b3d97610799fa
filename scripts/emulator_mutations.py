"""Plants one bug at a time in the CUDA device code, runs the emulated suite
(tests/test_cuda_emulated.py and the emulated Adam tests of tests/test_adam_step.py)
against it, and puts the source back: each bug must make the suite fail. About ten
minutes on 2 cores; not part of CI.

    python scripts/emulator_mutations.py [NAME-SUBSTRING...]   # all, or the matching ones
    python scripts/emulator_mutations.py --check               # only that every bug still applies
"""
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (what the bug is, the file, the code it replaces, what it puts there)
MUTATIONS = [
    ('no __syncthreads in block_sum', 'csrc/cuda/device/norm.cuh',
     '  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();',
     '  if (lane == 0) warp_sums[warp] = v;'),
    ('no alignment check', 'csrc/cuda/device/chunk.cuh',
     '  int64_t vec_end = aligned ? (n / V) * V : 0;',
     '  int64_t vec_end = (aligned || true) ? (n / V) * V : 0;'),
    ('half-warp shuffle in block_sum', 'csrc/cuda/device/norm.cuh',
     '  if (warp == 0)\n    for (int o = 16;',
     '  if (warp == 0 && lane < 16)\n    for (int o = 16;'),
    ('shuffle tree starting at 8', 'csrc/cuda/device/norm.cuh',
     '  __shared__ M warp_sums[kBlockSize / 32];\n  for (int o = 16;',
     '  __shared__ M warp_sums[kBlockSize / 32];\n  for (int o = 8;'),
    ('tail loop one past the end', 'csrc/cuda/device/chunk.cuh',
     'for (int64_t i = vec_end + threadIdx.x; i < n; i += blockDim.x)',
     'for (int64_t i = vec_end + threadIdx.x; i <= n; i += blockDim.x)'),
    ('finalize reads 16 warp sums', 'csrc/cuda/device/norm.cuh',
     '  if (threadIdx.x < 32) {\n    v = sums[threadIdx.x];',
     '  if (threadIdx.x < 32) {\n    v = threadIdx.x < 16 ? sums[threadIdx.x] : 0.0;'),
    ('finalize without barrier', 'csrc/cuda/device/norm.cuh',
     '  if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = v;\n  __syncthreads();',
     '  if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = v;'),
    ('momentum buffer not rounded to storage', 'csrc/cuda/device/updates.cuh',
     'const M stored = static_cast<M>(static_cast<T>(nb));',
     'const M stored = nb;'),
    ('perturb ignores a non-finite norm', 'csrc/cuda/device/updates.cuh',
     '      if (finite) {\n        M e',
     '      if (finite || true) {\n        M e'),
    ('continued tensor keeps the old size', 'csrc/cuda/mta_plan.h',
     '          tl.sizes[0] = tl.sizes[tensors - 1];\n',
     ''),
    ('found_inf ignored', 'csrc/cuda/device/updates.cuh',
     'if (a.found_inf_ptr != nullptr && *a.found_inf_ptr != 0.0f)',
     'if (false)'),
    ('vector loop stride of one vector per block', 'csrc/cuda/device/chunk.cuh',
     'i < vec_end; i += static_cast<int64_t>(blockDim.x) * V)',
     'i < vec_end; i += static_cast<int64_t>(blockDim.x))'),
    ('adaptive norm without eta', 'csrc/cuda/device/norm.cuh',
     'v *= (fabs(x[1]) + eta);',
     'v *= (fabs(x[1]) + eta * 0);'),
    ('nesterov uses d', 'csrc/cuda/device/updates.cuh',
     'd = a.nesterov ? d + mom * stored : stored;',
     'd = a.nesterov ? d + mom * d : stored;'),
    ('sgd: a NaN flag no longer skips', 'csrc/cuda/device/updates.cuh',
     'if (a.found_inf_ptr != nullptr && *a.found_inf_ptr != 0.0f)',
     'if (a.found_inf_ptr != nullptr && *a.found_inf_ptr > 0.0f)'),
    ('adam: a NaN flag no longer skips', 'csrc/cuda/device/adam_step.cuh',
     '*a.found_inf_ptr != 0.0f) {  // skipped',
     '*a.found_inf_ptr > 0.0f) {  // skipped'),
    ('adam: the flag skips the first chunk of each tensor only', 'csrc/cuda/device/adam_step.cuh',
     '*a.found_inf_ptr != 0.0f) {  // skipped',
     '*a.found_inf_ptr != 0.0f && tl.block_to_chunk[blockIdx.x] == 0) {  // skipped'),
    ('adam: a skipped step leaves w perturbed', 'csrc/cuda/device/adam_step.cuh',
     '[](M(&x)[kLists]) { x[0] = x[2]; }',
     '[](M(&x)[kLists]) { (void)x; }'),
    ("adam: amsgrad's max drops a NaN", 'csrc/adam_math.h',
     'return (a > b || a != a) ? a : b;',
     'return (a > b) ? a : b;'),
    ('adam: the head gradient not added', 'csrc/cuda/device/adam_step.cuh',
     'if constexpr (kHead) d += x[3];',
     'if constexpr (false) d += x[3];'),
    ('adam: the bias corrections swapped', 'csrc/cuda/device/adam_step.cuh',
     'a.scalars<M>(coef[0], coef[1], step_lr)',
     'a.scalars<M>(coef[1], coef[0], step_lr)'),
]
# The emulated tests each bug is run against: the whole emulated suite, and the Adam kernel's.
SUITE = ["tests/test_cuda_emulated.py", "tests/test_adam_step.py", "-k", "emulated or not test_adam_step"]


def main(args: list[str]) -> int:
    check_only = "--check" in args
    only = [a for a in args if a != "--check"]
    not_caught = []
    for name, path, old, new in MUTATIONS:
        if only and not any(o in name for o in only):
            continue
        f = ROOT / path
        src = f.read_text()
        if src.count(old) != 1:
            print(f"## {name}: the code it changes is not in {path} once (the source moved on: update the bug)")
            not_caught.append(name)
            continue
        if check_only:
            continue
        f.write_text(src.replace(old, new))
        try:
            t = time.time()
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUITE],
                               cwd=ROOT, capture_output=True, text=True, timeout=900)
            caught = [line for line in r.stdout.splitlines() if line.startswith(("FAILED", "E "))][:3]
            print(f"## {name}: {'caught' if r.returncode else 'NOT CAUGHT'} ({time.time() - t:.0f} s)")
            for line in caught:
                print("   ", line[:220])
            if r.returncode == 0:
                not_caught.append(name)
            sys.stdout.flush()
        finally:
            f.write_text(src)
    return 1 if not_caught else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
