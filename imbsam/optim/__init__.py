from imbsam.optim.imbsam import ImbSAM
from imbsam.optim.sam import SAM

__all__ = ["SAM", "ImbSAM"]
