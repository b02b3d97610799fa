"""imbsam: SAM, ASAM and ImbSAM (ICCV 2023) optimizers for PyTorch on fused kernels.

    import imbsam
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)

``imbsam.reference`` holds the plain PyTorch spec of every op; ``imbsam.ops`` the compiled
ones; ``imbsam.compat`` the paper's ``(optimizer, model, rho)`` adapters.
"""
from imbsam import (
           _fake,  # noqa: F401  (registers the fake kernels of the compiled ops)
           compat,
           models,
           ops,
           reference,
)
from imbsam.backends import available_backends
from imbsam.losses import HeadTailLoss, tail_class_mask
from imbsam.optim import SAM, ImbSAM

__version__ = "0.1.0"

__all__ = ["SAM", "ImbSAM", "HeadTailLoss", "tail_class_mask", "available_backends", "compat", "models", "ops",
           "reference"]
