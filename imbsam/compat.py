"""The paper's ``(optimizer, model, rho)`` adapters, ``imbsam.compat.SAM`` and
``imbsam.compat.ImbSAM``; they live in ``imbsam.optim.compat``, beside the engine they drive."""
from imbsam.optim import compat as _adapters
from imbsam.optim.compat import SAM, ImbSAM

__doc__ = _adapters.__doc__
__all__ = ["SAM", "ImbSAM"]
