"""Checkpoints written atomically: a crash mid-write never loses the previous one."""
from __future__ import annotations

import json
import os
import pickle

import torch


def atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then fsync and rename over ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


# What every checkpoint of save_checkpoint's callers holds (imbsam.train.run).
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "data_rng", "torch_rng", "history", "wall_s", "args")


def load_checkpoint(path: str, device: torch.device, keys: tuple = CHECKPOINT_KEYS) -> dict:
    """A checkpoint written by this trainer, loaded with ``weights_only=True``: tensors,
    numbers, strings and containers only, so a crafted file cannot run code. A file that
    is truncated, empty, not a checkpoint or not this trainer's is refused with a message
    (and left as it is). ``keys``: what the file must hold (another pipeline's checkpoints
    hold other things)."""
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no checkpoint at {path}")
    advice = ("it was not written by this trainer, or was cut short; move it away to start afresh, "
              "or point --out at the run it belongs to")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names a refused global as "Unsupported global: GLOBAL io.open was not an allowed
        # global" or, for a blocked module, "unsupported GLOBAL posix.system whose module posix is blocked".
        refused = next((line.strip() for line in str(exc).splitlines() if "unsupported global" in line.lower()), None)
        if refused is None:  # not a pickle of ours at all: random bytes, say
            raise SystemExit(f"--resume: {path} is not a readable checkpoint (UnpicklingError: "
                             f"{str(exc).strip().splitlines()[-1][:200]}); {advice}") from None
        # weights_only refused a global: the file holds something other than data.
        raise SystemExit(f"--resume: {path} holds more than tensors and plain data ({refused[:200]}); refusing "
                         f"to load it, since that could run code; {advice}") from None
    except Exception as exc:  # a damaged file fails anywhere in the unpickler (IndexError, KeyError, ...)
        raise SystemExit(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: "
                         f"{str(exc).strip()[:200]}); {advice}") from None
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise SystemExit(f"--resume: {path} is not a checkpoint of this trainer (missing: {', '.join(missing)}); "
                         f"{advice}")
    return ck


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)
