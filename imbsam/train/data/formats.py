"""Readers of the datasets' own file formats: CIFAR's python pickles and MNIST-style IDX."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np

# IDX magic numbers: 0x08 is unsigned byte data; the low byte is the number of dimensions.
_IDX_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as a uint8 array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX file")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {body.size} values")
    return body.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array as IDX (gzip when the name ends in .gz): for tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, _IDX_UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what CIFAR's python batches hold: dicts, lists, strings, numbers and
    numpy arrays. Any other global a pickle names (os.system, say) is refused, so a file
    that is not what it claims to be cannot run code, even past a failed checksum."""

    # numpy's array reconstruction, under numpy 1 (numpy.core) and 2 (numpy._core) names.
    ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | {
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode")}  # how protocol 2 spells bytes (an array's buffer) for Python 3: no code runs

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays, "
                                         "lists, strings and numbers")
        return super().find_class(module, name)


def read_cifar_batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle: images (N, 3, 32, 32) uint8 and labels (N,) int64.

    ``label_key`` is ``labels`` for CIFAR-10 and ``fine_labels`` for CIFAR-100. Read with a
    restricted unpickler: nothing in the file can run code.
    """
    with open(path, "rb") as f:
        try:
            entry = _CifarUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: not a CIFAR batch (a pickled {type(entry).__name__}, not a dict)")
    if "data" not in entry or label_key not in entry:
        raise ValueError(f"{path}: not a CIFAR batch with 'data' and {label_key!r} (keys: {sorted(entry)})")
    images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(entry[label_key], dtype=np.int64)
