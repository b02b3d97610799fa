"""The README's Python examples, and those of the docs it points to, run as written (on a
tiny batch)."""
from __future__ import annotations

import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# In reading order: the docs' examples use the README's model, optimizer and loss split.
DOCUMENTS = ("README.md", "docs/semantics.md")


def python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for name in DOCUMENTS:
        with open(os.path.join(ROOT, name)) as f:
            blocks += [(name, block) for block in re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)]
    return blocks


def test_readme_examples_run():
    blocks = python_blocks()
    assert len(blocks) >= 4 and {name for name, _ in blocks} == set(DOCUMENTS)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 50, 98, 99])
    scope = dict(loader=[(x, y)], class_counts=[500 - 4 * c for c in range(100)], x=x, y=y)
    for name, block in blocks:  # the blocks build on each other, as a reader would run them
        exec(compile(block, name, "exec"), scope)
    assert all(torch.isfinite(p).all() for p in scope["model"].parameters())
