"""A ``torch.compile`` backend for ImbSAM's recipe, whose head backward keeps the graph.

ImbSAM backpropagates twice through one forward: the head loss with
``retain_graph=True``, then the tail loss. Inductor (torch >= 2.5) donates the tensors a
compiled forward saves to its backward, which may then overwrite them, so it refuses any
``retain_graph=True`` backward through such a graph (torch's "donated buffers" error).
Whether a graph donates is decided when its forward is compiled, from
``torch._functorch.config.donated_buffer``; this backend compiles with that switch off,
for its own graphs only, so the user changes no global setting. The backward then keeps
the saved tensors as eager autograd does with ``retain_graph=True``; nothing else about
the compiled code changes. SAM's recipe needs none of this (each backward follows its
own forward): plain ``torch.compile(model)`` works there.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Union

import torch
import torch._functorch.config

Backend = Callable[[torch.fx.GraphModule, list], Callable]


def _no_donated_buffers():
    # torch < 2.5 donates nothing and has no switch.
    if not hasattr(torch._functorch.config, "donated_buffer"):
        return contextlib.nullcontext()
    return torch._functorch.config.patch(donated_buffer=False)


def retain_graph_backend(backend: Union[str, Backend] = "inductor") -> Backend:
    """``backend`` (a name ``torch.compile`` accepts, or a backend callable), compiling
    graphs through which ``backward(retain_graph=True)`` may run:

        model = torch.compile(model, backend=imbsam.retain_graph_backend())

    ``mode=`` and ``options=`` of ``torch.compile`` go with its own inductor backend
    only, so they are not available through this one."""
    if isinstance(backend, str):
        inner = torch._dynamo.lookup_backend(backend)
    elif callable(backend):
        inner = backend
    else:
        raise TypeError(f"backend must be a torch.compile backend name or callable, got {type(backend).__name__}")

    def compile_keeping_saved_tensors(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        # The forward is compiled here, and with it the choice of donated buffers (none);
        # the backward, compiled lazily later, follows that choice.
        with _no_donated_buffers():
            return inner(graph, example_inputs)

    return compile_keeping_saved_tensors
