"""The step counts of the fused Adam(W) step on a device, in torch ops: the increment and
each tensor's bias corrections, computed on the device (no host sync, capturable). The
Triton backend uses them; csrc/cuda/adam_step.cu does the same in ATen, and the CPU
kernel on the host."""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


def increment(state_steps: Sequence[Tensor], found_inf: Optional[Tensor]) -> None:
    """state_steps += 1, or += (found_inf == 0) (NaN skips): one foreach add per step dtype."""
    by_dtype = defaultdict(list)
    for s in state_steps:
        by_dtype[s.dtype].append(s)
    for dtype, steps in by_dtype.items():
        if found_inf is None:
            torch._foreach_add_(steps, 1)
        else:
            keep = (found_inf == 0).to(dtype)
            torch._foreach_add_(steps, [keep] * len(steps))


def bias_corrections(state_steps: Sequence[Tensor], device: torch.device, lr: Union[float, Tensor], beta1: float,
                     beta2: float) -> Tensor:
    """Per tensor i, on ``device`` in float64: ``[2 i]`` = lr / (1 - beta1^step) and
    ``[2 i + 1]`` = sqrt(1 - beta2^step), flat. CPU step counts (plain Adam's) travel in one
    copy from pinned memory."""
    steps = torch.stack(list(state_steps)).to(torch.float64)
    if steps.device != device:
        steps = (steps.pin_memory() if device.type == "cuda" else steps).to(device, non_blocking=True)
    lr = lr.to(device=device, dtype=torch.float64) if isinstance(lr, Tensor) else lr
    step_size = lr / (1 - torch.pow(beta1, steps))
    return torch.stack([step_size, torch.sqrt(1 - torch.pow(beta2, steps))], dim=1).reshape(-1)
