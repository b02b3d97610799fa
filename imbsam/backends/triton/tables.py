"""Address tables and launch plans of the Triton kernels: what a launch reads of the tensors.

The kernels take tensor addresses from tables built on the host (one per dtype and
alignment), copied to the device once and found again by the tensors' addresses.
"""
import contextlib
import warnings
from typing import Callable, Sequence

import torch
import triton.language as tl
from torch import Tensor

from imbsam.backends import checks
from imbsam.backends.triton import kernels as K


class Tables:
    """One launch group (one dtype, one alignment): tensor addresses per list, sizes, the
    chunk -> (tensor, start) map, and each tensor's index in the call's lists (``index``:
    where a kernel finds a per-tensor value of the call), on the tensors' device."""

    def __init__(self, lists: list[list[Tensor]], aligned: bool, index: Sequence[int]):
        device = lists[0][0].device
        sizes = [t.numel() for t in lists[0]]
        chunk_tensor, chunk_start = [], []
        for i, n in enumerate(sizes):
            for start in range(0, n, K.CHUNK):
                chunk_tensor.append(i)
                chunk_start.append(start)
        host = [torch.tensor([[t.data_ptr() for t in lst] for lst in lists], dtype=torch.int64),
                torch.tensor(sizes, dtype=torch.int64), torch.tensor(chunk_tensor, dtype=torch.int64),
                torch.tensor(chunk_start, dtype=torch.int64), torch.tensor(index, dtype=torch.int64)]
        self.streams: set = set()
        if device.type == "cuda":
            # Pinned source + non_blocking: the copy is queued on the stream, no host sync.
            # In a capture the source stays pageable: the pinned allocator has failed under
            # capture in earlier torch versions (it queries events), while a non_blocking copy
            # from pageable memory is captured as a copy node that reads it at each replay.
            # The host tensors stay referenced: a graph that captured this copy replays it.
            capturing = torch.cuda.is_current_stream_capturing()
            self._host = host if capturing else [h.pin_memory() for h in host]
            stream = torch.cuda.current_stream(device)
            self.addrs, self.sizes, self.chunk_tensor, self.chunk_start, self.index = (
                h.to(device, non_blocking=True) for h in self._host)
            self.streams.add(stream)
            self.ready = torch.cuda.Event()
            if not capturing:  # a captured plan is never used eagerly
                self.ready.record(stream)
        else:
            self.addrs, self.sizes, self.chunk_tensor, self.chunk_start, self.index = host
        self.n_chunks = len(chunk_tensor)
        # Every list's tensor 16-byte aligned: the kernels may load and store 16 bytes at a time.
        self.aligned = aligned

    def use_on(self, stream, capturing: bool) -> None:
        """Makes the tables safe to read on ``stream``: it waits for their copy, and the
        allocator will not reuse their memory before the stream is done with it."""
        if capturing or stream in self.streams:
            # In a capture: torch.cuda.graph synchronised before it began, so the copy is
            # done, and CAPTURE_PLANS keeps the memory for as long as graphs may replay.
            return
        stream.wait_event(self.ready)
        for t in (self.addrs, self.sizes, self.chunk_tensor, self.chunk_start, self.index):
            t.record_stream(stream)
        self.streams.add(stream)


def aligned(lists: Sequence[Sequence[Tensor]], i: int) -> bool:
    return all(lst[i].data_ptr() % 16 == 0 for lst in lists)


def build_plan(lists: Sequence[Sequence[Tensor]]) -> list:
    """(triton dtype, math dtype, tables) per launch group: one group per dtype and
    alignment, so one misaligned tensor (a view into a DDP bucket, say) leaves the others
    on the 16-byte path. Empty tensors get no group."""
    by_group: dict = {}
    for i, t in enumerate(lists[0]):
        if t.numel():
            by_group.setdefault((t.dtype, aligned(lists, i)), []).append(i)
    return [(*types_of(dtype), Tables([[lst[i] for i in idx] for lst in lists], aligned, idx))
            for (dtype, aligned), idx in by_group.items()]


# Plans of eager calls: a training loop uses a handful of tensor sets (one per op and
# param group), so a small cache hits every step; the oldest entry goes when it is full.
PLANS: dict = {}
PLANS_SIZE = 64
# Plans that a CUDA-graph capture used. A graph replays the launches it captured, which
# read these tables' device memory (and copy from their pinned memory, when the capture
# built them): they are kept apart from the eager plans, never handed to an eager call
# (a capture's copies only run at replay), and kept while there is room.
CAPTURE_PLANS: dict = {}
CAPTURE_PLANS_SIZE = 1024
_warned_capture_eviction = False


def plan_for(lists: Sequence[Sequence[Tensor]], validate: Callable[[], None]) -> "Plan":
    """The launch groups for these tensors, validated once (``validate`` raises before any
    write). A plan is found again by every tensor's address and strides and the
    parameters' dtypes and sizes: what the launches read. Strides of every list: a new
    gradient often lands at a freed one's address, and one laid out unlike its parameter
    (a transposed view) must meet the validation that refuses it, not an old plan that
    would walk it as the parameter's layout. The other lists' dtypes equal the parameters'
    when the plan is built, and stay so while their addresses do: they are the
    parameters' gradients (torch refuses a gradient of another dtype) and the
    optimizer's own backups and buffers (made as the parameters' twins)."""
    global _warned_capture_eviction
    key = (len(lists), *(tuple(map(Tensor.data_ptr, lst)) for lst in lists),
           *(tuple(map(Tensor.stride, lst)) for lst in lists),
           tuple(checks.each("dtype", lists[0])), tuple(map(Tensor.size, lists[0])))
    on_cuda = lists[0][0].is_cuda
    capturing = on_cuda and torch.cuda.is_current_stream_capturing()
    plan = PLANS.get(key)
    if capturing:
        plan = plan or CAPTURE_PLANS.get(key)
    if plan is None:
        validate()
        plan = Plan(build_plan(lists), lists)
        if not capturing:
            if len(PLANS) >= PLANS_SIZE:
                PLANS.pop(next(iter(PLANS)))
            PLANS[key] = plan
    if capturing and key not in CAPTURE_PLANS:
        if len(CAPTURE_PLANS) >= CAPTURE_PLANS_SIZE:
            CAPTURE_PLANS.pop(next(iter(CAPTURE_PLANS)))
            if not _warned_capture_eviction:
                _warned_capture_eviction = True
                warnings.warn(f"imbsam (triton): more than {CAPTURE_PLANS_SIZE} tensor sets captured in CUDA "
                              "graphs; the oldest one's address tables are released, so a graph captured that "
                              "long ago must be captured again before it is replayed", RuntimeWarning, stacklevel=2)
        CAPTURE_PLANS[key] = plan
    if on_cuda:
        stream = torch.cuda.current_stream(lists[0][0].device)
        for _, _, tables in plan.groups:
            tables.use_on(stream, capturing)
    return plan


class Plan:
    """One op call's launch groups, and what the call needs of the tensors besides."""

    def __init__(self, groups: list, lists: Sequence[Sequence[Tensor]]):
        self.groups = groups
        self.n_chunks = sum(tab.n_chunks for _, _, tab in groups)
        self.has_double = torch.float64 in set(checks.each("dtype", lists[0]))


def types_of(dtype: torch.dtype):
    """(storage, math) Triton types of a torch dtype: fp64 computes in fp64, the rest in fp32."""
    storage = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
               torch.float16: tl.float16}[dtype]
    return storage, tl.float64 if dtype == torch.float64 else tl.float32


def launch(kernel, tables: Tables, *args, **meta):
    # enable_fp_fusion=False: no fused multiply-adds (Triton fuses by default), so the GPU
    # rounds each product and sum as the reference does; memory-bound kernels lose nothing.
    if tables.n_chunks:
        kernel[(tables.n_chunks,)](*args, tables.sizes, tables.chunk_tensor, tables.chunk_start, **meta,
                                   CHUNK=K.CHUNK, BLOCK=K.BLOCK, ALIGNED=tables.aligned, enable_fp_fusion=False)


def on_device(t: Tensor):
    """Launches run on the current device: make it the tensors' (a model on cuda:1 while
    cuda:0 is current would otherwise launch on the wrong GPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

