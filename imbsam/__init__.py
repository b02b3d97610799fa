"""imbsam: SAM, ASAM and ImbSAM (ICCV 2023) optimizers for PyTorch on fused kernels.

    import imbsam
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)

``imbsam.reference`` holds the plain PyTorch spec of every op and ``imbsam.ops`` the
compiled ones (both in ``imbsam.backends``); ``imbsam.compat`` the paper's
``(optimizer, model, rho)`` adapters; ``imbsam.schedules`` which steps sharpen;
``imbsam.train`` the long-tailed training pipeline.
"""
from imbsam import compat, schedules
from imbsam.backends import available_backends, reference
from imbsam.backends import compiled as ops
from imbsam.batch_norm import frozen_running_stats
from imbsam.compiling import compile_step, retain_graph_backend
from imbsam.losses import HeadTailLoss, tail_class_mask
from imbsam.optim import SAM, ImbSAM
from imbsam.optim.data_parallel import sync_data_parallel
from imbsam.optim.grad_scaler import use_grad_scaler

__version__ = "0.1.0"

__all__ = ["SAM", "ImbSAM", "HeadTailLoss", "tail_class_mask", "available_backends", "compat", "ops", "reference",
           "sync_data_parallel", "use_grad_scaler",
           "frozen_running_stats", "retain_graph_backend", "compile_step", "schedules"]
