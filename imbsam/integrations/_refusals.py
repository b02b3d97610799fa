"""What every integration refuses, in one place: the trainers' loops take a fixed set of
passes and have a GradScaler of their own."""
from __future__ import annotations


def refuse_schedule_and_grad_scaler(optimizer, where: str) -> None:
    """A sharpness schedule (a step it does not sharpen takes other passes) and
    ``use_grad_scaler`` (the trainer's own scaler serves): refused before any write."""
    if optimizer.schedule is not None or "grad_scaler" in optimizer._engine.helpers:
        raise RuntimeError(f"imbsam: {type(optimizer).__name__} in {where} takes neither a sharpness schedule nor "
                           "use_grad_scaler (the trainer's own GradScaler serves): build the optimizer without "
                           "schedule= and drop use_grad_scaler")
