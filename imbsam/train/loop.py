"""One training epoch and the test evaluation, both without per-iteration host syncs."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import torch
from torch import Tensor

from imbsam.train.data.profile import SHOT_GROUPS

# The progress bar reads the device counters this often (each read is a host sync).
PROGRESS_EVERY = 20


def train_epoch(step: Callable, loader, lr_of: Callable[[], float], progress: bool, desc: str,
                sum_over_ranks: Callable[[Tensor], Tensor] = lambda t: t, world: int = 1,
                accuracy: bool = True) -> dict:
    """Runs ``step(x, y) -> (loss, logits)`` over the loader; loss and accuracy stay on the device.
    ``accuracy=False``: the outputs are not class scores (Deep SAD's embeddings), and no
    accuracy is counted or reported.

    Data-parallel (``world`` ranks, each on its share of every batch): the epoch's totals
    are summed over the ranks once at its end; the progress bar shows this rank's loss
    and accuracy and the images per second of all ranks together."""
    device = loader.labels.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(loader), desc=desc, leave=False, mininterval=1.0, dynamic_ncols=True)
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        loss, logits = step(x, y)
        loss_sum += loss.float() * y.numel()
        if accuracy:
            correct += (logits.argmax(1) == y).sum()
        seen += y.numel()
        if bar is not None:
            bar.update(1)
            if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == len(loader):
                elapsed = time.perf_counter() - start
                shown = dict(loss=f"{loss_sum.item() / seen:.3f}")
                if accuracy:
                    shown["acc"] = f"{100 * correct.item() / seen:.1f}"
                bar.set_postfix(**shown, lr=f"{lr_of():.2e}", img_s=f"{world * seen / elapsed:.0f}", refresh=False)
    if bar is not None:
        bar.close()
    totals = sum_over_ranks(torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)]))
    total_loss, total_correct, seen = totals.tolist()  # one sync per epoch
    seconds = time.perf_counter() - start
    stats = dict(train_loss=total_loss / max(seen, 1), images=int(seen), train_s=seconds,
                 images_per_s=seen / seconds if seconds > 0 else 0.0)
    if accuracy:
        stats["train_acc"] = 100 * total_correct / max(seen, 1)
    return stats


@torch.no_grad()
def per_class_accuracy(model: torch.nn.Module, loader, num_classes: int,
                       autocast_dtype: Optional[torch.dtype] = None,
                       sum_over_ranks: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
    """Percent correct per class; the logits are averaged with the horizontally flipped image.
    Data-parallel, each rank counts its share of the test set and the counts are summed."""
    device = loader.labels.device
    correct = torch.zeros(num_classes, device=device)
    total = torch.zeros(num_classes, device=device)
    was_training = model.training
    model.eval()
    amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    with amp:
        for x, y in loader:
            logits = model(x).float() + model(x.flip(3)).float()
            hits = (logits.argmax(1) == y).float()
            correct.scatter_add_(0, y, hits)  # no bincount: its output size would need a host sync
            total.scatter_add_(0, y, torch.ones_like(hits))
    model.train(was_training)
    correct, total = sum_over_ranks(torch.stack([correct, total]))
    return (100 * correct / total.clamp_min(1)).cpu()


def group_accuracy(per_class: Tensor, groups: list[str]) -> dict:
    """Mean per-class accuracy over Many / Medium / Few classes and over all (the paper's ALL)."""
    out = {}
    for name in SHOT_GROUPS:
        idx = [i for i, g in enumerate(groups) if g == name]
        out[name] = float(per_class[idx].mean()) if idx else float("nan")
    out["all"] = float(per_class.mean())
    return out
