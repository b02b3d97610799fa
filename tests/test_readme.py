"""The README's Python examples run as written (on a tiny batch)."""
from __future__ import annotations

import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_examples_run():
    blocks = python_blocks()
    assert len(blocks) >= 3
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 50, 98, 99])
    scope = dict(loader=[(x, y)], class_counts=[500 - 4 * c for c in range(100)], x=x, y=y)
    for block in blocks:  # the blocks build on each other, as a reader would run them
        exec(compile(block, "README.md", "exec"), scope)
    assert all(torch.isfinite(p).all() for p in scope["model"].parameters())
