"""torch.compile for SAM's and ImbSAM's recipes: a model whose graph ImbSAM's head backward
keeps (``retain_graph_backend``), and a whole training step as one graph (``compile_step``).

ImbSAM backpropagates twice through one forward: the head loss with
``retain_graph=True``, then the tail loss. Inductor (torch >= 2.5) donates the tensors a
compiled forward saves to its backward, which may then overwrite them, so it refuses any
``retain_graph=True`` backward through such a graph (torch's "donated buffers" error).
Whether a graph donates is decided when its forward is compiled, from
``torch._functorch.config.donated_buffer``; ``retain_graph_backend`` compiles with that
switch off, for its own graphs only, so the user changes no global setting. The backward
then keeps the saved tensors as eager autograd does with ``retain_graph=True``; nothing
else about the compiled code changes. SAM's recipe needs none of this (each backward
follows its own forward): plain ``torch.compile(model)`` works there.

A whole step (forwards, backwards, the optimizer's phases) is one graph when dynamo
traces ``backward()`` into it, which it does only under
``torch._dynamo.config.trace_autograd_ops`` (off by default); ``compile_step`` turns it on
around its own calls. The phases trace when the step is fused (``torch.optim.SGD``,
``Adam`` or ``AdamW`` on a backend with the fused base step): any other base optimizer's
``step()`` breaks the graph, as every ``torch.optim`` step does by design.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Union

import torch
import torch._dynamo
import torch._functorch.config
import torch._guards

Backend = Callable[[torch.fx.GraphModule, list], Callable]


def _no_donated_buffers():
    # torch < 2.5 donates nothing and has no switch. (AOT autograd's cache keys a graph with
    # this setting, so a donating copy of it is never loaded in its place.)
    if not hasattr(torch._functorch.config, "donated_buffer"):
        return contextlib.nullcontext()
    return torch._functorch.config.patch(donated_buffer=False)


def _say_nothing_is_donated() -> None:
    """Records that the graph just compiled donates no buffer. Compiled with donation off,
    its list of donated buffers is left uncomputed (None), and torch's check at every
    retained backward reads None as a non-empty list unless a lazily compiled backward
    has set it to []. A backward compiled with its forward (a graph recompiled for another
    batch size, whose backward takes sizes) never does: every retained backward through
    it was refused."""
    context = torch._guards.TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None)
    if meta is not None and getattr(meta, "bw_donated_idxs", []) is None:
        meta.bw_donated_idxs = []


# Inductor's FX graph cache keys a backward graph without its donated buffers (torch 2.14),
# so the same graph compiled earlier to donate (plain inductor, in this or an earlier
# process) would be loaded for ours and overwrite the saved tensors a retained backward
# still reads: silently wrong gradients. Ours neither read nor write that cache; inductor
# applies these patches to the lazily compiled backward too.
_INDUCTOR_PATCHES = {"fx_graph_cache": False}


def retain_graph_backend(backend: Union[str, Backend] = "inductor") -> Backend:
    """``backend`` (a name ``torch.compile`` accepts, or a backend callable), compiling
    graphs through which ``backward(retain_graph=True)`` may run:

        model = torch.compile(model, backend=imbsam.retain_graph_backend())

    ``mode=`` and ``options=`` of ``torch.compile`` go with its own inductor backend
    only, so they are not available through this one. Its graphs bypass inductor's
    FX graph cache (see ``_INDUCTOR_PATCHES``), so they compile anew in every process; a callable
    ``backend`` that compiles through inductor must turn its FX graph cache off itself."""
    if backend == "inductor":
        inner = functools.partial(torch._dynamo.lookup_backend("inductor"), config_patches=_INDUCTOR_PATCHES)
    elif isinstance(backend, str):
        inner = torch._dynamo.lookup_backend(backend)
    elif callable(backend):
        inner = backend
    else:
        raise TypeError(f"backend must be a torch.compile backend name or callable, got {type(backend).__name__}")

    def compile_keeping_saved_tensors(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        # The forward is compiled here, and with it the choice of donated buffers (none);
        # the backward, compiled lazily later, follows that choice.
        with _no_donated_buffers():
            compiled = inner(graph, example_inputs)
        _say_nothing_is_donated()
        return compiled

    return compile_keeping_saved_tensors


class StepNotCompilable(RuntimeError):
    """What ``compile_step`` cannot compile, said by the optimizer before anything is written."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message  # as said: dynamo appends its trace to the arguments of what it wraps


# Whether a compile_step call is running (set around it, read by the engine's first phase).
_IN_COMPILE_STEP = [False]


def in_compile_step() -> bool:
    return _IN_COMPILE_STEP[0]


@torch.compiler.assume_constant_result
def refuse_in_compile_step(message: str) -> bool:
    """Raises ``StepNotCompilable(message)``: while dynamo traces too (it runs a function it
    may assume constant at once, where a plain ``raise`` in traced code would come out as
    dynamo's "Observed exception" with the message buried in it)."""
    raise StepNotCompilable(message)


def _refusal_in(error: BaseException):
    """The ``StepNotCompilable`` that ``error`` (dynamo's wrapper of it) was raised from, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, StepNotCompilable):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _recompile_limit_errors() -> tuple:
    names = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit", "RecompileLimitExceeded", "CacheLimitExceeded")
    return tuple(getattr(torch._dynamo.exc, name) for name in names if hasattr(torch._dynamo.exc, name))


# compile_step's own recompile limit, dynamo's default, whatever the process has set: a step
# recompiled at every call (a float lr under a scheduler) is then named at its 9th compile.
# timm.optim sets the process's limit to 1,000,000 at import; with it such a step recompiled
# at every step without a word.
_RECOMPILE_LIMIT = {("recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"): 8}


def compile_step(step: Callable, backend: Union[str, Backend] = "inductor", fullgraph: bool = True,
                 **compile_kwargs: Any) -> Callable:
    """``step`` (a function that runs forwards, backwards and the optimizer's phases)
    compiled by ``torch.compile(step, fullgraph=fullgraph, backend=backend, **compile_kwargs)``,
    called with dynamo tracing ``backward()`` into the graph:

        step = imbsam.compile_step(step)          # e.g. imbsam.train.step.make_step(...)

    Anything dynamo cannot put in the one graph is an error at the first call, not a silent
    graph break (``fullgraph=False`` is refused: use ``torch.compile(step)`` for a step with
    graph breaks, a GradScaler's for one). The optimizer's step must be fused
    (``torch.optim.SGD``, ``Adam`` or ``AdamW`` on cpp, cuda or triton): any other is
    refused at the first phase, before anything is written, naming it. Give the base
    optimizer a tensor ``lr`` (``lr=torch.tensor(0.1)``; LR schedulers update it in
    place): a float ``lr`` is a constant of the graph, and each change recompiles it."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        raise RuntimeError(f"imbsam.compile_step: torch {torch.__version__} cannot trace backward() into a graph "
                           "(torch._dynamo.config.trace_autograd_ops is missing); compile the model alone, or "
                           "torch.compile(step) with graph breaks")
    if not callable(step):
        raise TypeError(f"compile_step() takes the step function to compile, got {type(step).__name__}")
    # Traced with graph breaks and backward() tracing on, dynamo (torch 2.14.1) failed inside
    # the phases ("'forward' not in cell_and_freevars") once other steps had been compiled in
    # the process, and later compiles failed too: one graph or plain torch.compile(step).
    if fullgraph is not True:
        raise ValueError("imbsam.compile_step compiles a whole step into one graph (fullgraph=True); for a step "
                         "with graph breaks (a GradScaler's, another base optimizer's) use torch.compile(step), "
                         "which trains as eager")
    compiled = torch.compile(step, fullgraph=fullgraph, backend=backend, **compile_kwargs)

    @functools.wraps(step)
    def compiled_step(*args, **kwargs):
        # At every call, not at torch.compile(): dynamo traces (and retraces) when called.
        outer, _IN_COMPILE_STEP[0] = _IN_COMPILE_STEP[0], True
        try:
            with torch._dynamo.config.patch(trace_autograd_ops=True, **_RECOMPILE_LIMIT):
                return compiled(*args, **kwargs)
        except _recompile_limit_errors() as error:
            raise RuntimeError(
                "imbsam.compile_step: the step was recompiled until dynamo's limit, because a value it reads "
                "changed at each call (this call did not run). The usual one is a float lr that an LR scheduler "
                "changes: give the base optimizer a tensor lr, e.g. torch.optim.SGD(..., lr=torch.tensor(0.1)), "
                "which schedulers update in place. TORCH_LOGS=recompiles names the value") from error
        except Exception as error:
            refusal = _refusal_in(error)
            if refusal is None:
                raise
            raise StepNotCompilable(refusal.message) from None
        finally:
            _IN_COMPILE_STEP[0] = outer

    return compiled_step
