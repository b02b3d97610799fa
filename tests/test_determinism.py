"""The test suite's own settings for GPU comparisons."""
from __future__ import annotations

import torch


def test_gpu_comparisons_are_deterministic_in_every_test_process():
    # conftest sets these at import, so they hold in whichever file or xdist worker runs first.
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
