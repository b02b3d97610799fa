"""Checkpoints written atomically: a crash mid-write never loses the previous one."""
from __future__ import annotations

import json
import os

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


def load_checkpoint(path: str, device: torch.device) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no checkpoint at {path}")
    # weights_only=False: the checkpoint holds RNG states and the metric history, written by us.
    return torch.load(path, map_location=device, weights_only=False)


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)
