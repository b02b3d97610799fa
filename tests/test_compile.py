"""torch.compile sees the custom ops through their fake kernels: a whole fused step compiles
with fullgraph=True (no graph breaks) and gives the eager result."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch._functorch.config

import imbsam

from conftest import COMPILES_MUTABLE_LISTS, fast_backend, max_err


def make_state(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda: [torch.randn(n, generator=gen).to(device) for n in (7, 300, 4099)]  # noqa: E731
    return dict(params=mk(), tail=mk(), tail2=mk(), head=mk(), backups=mk(), bufs=mk())


def imbsam_step(ops, s, lr):
    """The optimizer-side ImbSAM step on the compiled ops: norm, perturb, fused restore + SGD."""
    norm = ops.grad_norm(s["tail"], [], [], 0.01)
    ops.perturb_(s["params"], s["tail"], s["backups"], norm, 0.05, 0.01, False)
    found_inf = torch.isfinite(norm).logical_not().to(torch.float32)
    ops.restore_sgd_step_(s["params"], s["tail2"], s["backups"], s["head"], s["bufs"], 0.0, 0.9, 0.0, 1e-3,
                          False, False, False, lr, found_inf)
    return norm


@pytest.mark.skipif(not COMPILES_MUTABLE_LISTS, reason="torch < 2.5 cannot compile ops that mutate tensor lists")
@fast_backend
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend, device, compile_backend):
    if backend == "triton" and compile_backend == "inductor" and device == "cpu":
        pytest.skip("inductor would compile its own Triton kernels for the CPU: not under the interpreter")
    ops = imbsam.backends.ops_for(backend)
    lr = torch.tensor(0.1, device=device)
    eager, compiled = make_state(device), make_state(device)
    torch._dynamo.reset()
    step = torch.compile(lambda s, lr: imbsam_step(ops, s, lr), fullgraph=True, backend=compile_backend)
    for _ in range(3):
        n_eager = imbsam_step(ops, eager, lr)
        n_compiled = step(compiled, lr)
    assert torch.allclose(n_eager, n_compiled)
    for key in ("params", "bufs"):
        assert max_err(compiled[key], eager[key]) < 1e-6, key


def train_compiled(method: str, compile_backend, whole_step: bool = False):
    """Three steps of SAM or ImbSAM on a small BatchNorm CNN, the model (or with
    ``whole_step`` the whole step function) compiled with ``compile_backend`` (None: eager)."""
    from imbsam.train.step import make_step

    from models import batches, small_cnn

    model = small_cnn()
    cls = imbsam.ImbSAM if method == "imbsam" else imbsam.SAM
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    torch._dynamo.reset()
    net = torch.compile(model, backend=compile_backend) if compile_backend and not whole_step else model
    step = make_step(method, net, opt, imbsam.HeadTailLoss([100, 90, 80, 70, 60, 50, 40, 3, 2, 1]))
    if compile_backend and whole_step:
        step = torch.compile(step, backend=compile_backend)
    for x, y in batches(3, seed=4):
        step(x, y)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method,compile_backend", [("sam", "aot_eager"), ("sam", "inductor"), ("imbsam", "aot_eager"),
                                                    ("imbsam", "retain-graph inductor")])
def test_a_compiled_model_trains_as_the_eager_one(method, compile_backend):
    """torch.compile(model) under SAM's and ImbSAM's recipes, ImbSAM's two backward passes
    through one forward included (on inductor through imbsam.retain_graph_backend)."""
    if compile_backend == "retain-graph inductor":
        compile_backend = imbsam.retain_graph_backend("inductor")
    assert max_err(train_compiled(method, compile_backend), train_compiled(method, None)) < 1e-5


@pytest.mark.skipif(not COMPILES_MUTABLE_LISTS, reason="torch < 2.5 cannot compile ops that mutate tensor lists")
@pytest.mark.parametrize("method,compile_backend", [("sam", "aot_eager"), ("imbsam", "retain-graph inductor")])
def test_a_compiled_whole_step_trains_as_the_eager_one(method, compile_backend):
    """torch.compile of the whole step function (forward, backward, phases), with the graph
    breaks torch makes at each backward and imbsam's engine makes at each phase."""
    if compile_backend == "retain-graph inductor":
        compile_backend = imbsam.retain_graph_backend("inductor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = train_compiled(method, compile_backend, whole_step=True)
    assert max_err(compiled, train_compiled(method, None)) < 1e-5
    # Dynamo warns when it traces past a functools cache (the backend registry's, once).
    assert not [w for w in caught if "lru_cache" in str(w.message)]


@pytest.mark.skipif(not hasattr(torch._functorch.config, "donated_buffer"), reason="torch < 2.5 donates no buffers")
@pytest.mark.parametrize("how", ["phases", "step(closure)"])
def test_plain_inductor_under_imbsam_refuses_loudly_or_trains_as_eager(how):
    """Why retain_graph_backend exists: inductor donates saved activations to the backward
    and, in the torch versions that decide so when the forward is compiled, refuses
    ImbSAM's retain_graph=True (torch's error; under step(closure) with imbsam's hint).
    Newer ones (torch 2.14.1 here, 2026-12-04) compile a backward whose first run keeps
    the graph without donating, and then train as eager. Never a silent wrong gradient."""
    from models import batches, small_cnn

    torch._dynamo.reset()
    model = small_cnn()
    net = torch.compile(model)
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    split = imbsam.HeadTailLoss([100, 90, 80, 70, 60, 50, 40, 3, 2, 1])
    from imbsam.train.step import make_step

    step = make_step("imbsam", net, opt, split)
    try:
        for x, y in batches(3, seed=4):
            if how == "phases":
                step(x, y)
            else:
                opt.step(lambda: split(net(x), y))
                opt.zero_grad()
    except RuntimeError as error:
        hint = r"torch.compile\(model, backend=imbsam.retain_graph_backend\(\)\)"
        assert re.search("donated buffers" if how == "phases" else hint, str(error)), str(error)
        return
    assert max_err([p.detach() for p in model.parameters()], train_compiled("imbsam", None)) < 1e-5


def test_the_hint_for_inductors_refusal_names_retain_graph_backend():
    from imbsam.optim.imbsam import _with_compile_hint

    def refused():
        raise RuntimeError("This backward function was compiled with non-empty donated buffers which requires "
                           "create_graph=False and retain_graph=False.")
    with pytest.raises(RuntimeError, match=r"backend=imbsam.retain_graph_backend\(\)") as caught:
        _with_compile_hint(refused)
    assert "donated buffers" in str(caught.value.__cause__)
    with pytest.raises(RuntimeError, match="^other$"):  # any other error passes through as it was
        _with_compile_hint(lambda: (_ for _ in ()).throw(RuntimeError("other")))


def head_then_tail_gradients(compile_backend, retain: bool = True, batch_sizes=None):
    """Per batch (two of 16, or one of each of ``batch_sizes``), the head gradient with
    retain_graph=True, then the tail gradient through the same forward; without
    ``retain``, the whole loss through a forward each (SAM's pattern: nothing is returned)."""
    from models import batches, small_cnn

    split = imbsam.HeadTailLoss([100, 90, 80, 70, 60, 50, 40, 3, 2, 1])
    model = small_cnn()
    net = torch.compile(model, backend=compile_backend) if compile_backend else model
    out = []
    data = batches(2, seed=4) if batch_sizes is None else [
        batches(1, seed=4 + i, batch=n)[0] for i, n in enumerate(batch_sizes)]
    for x, y in data:
        head, tail = split(net(x), y)
        if not retain:
            (head + tail).backward()
            continue
        for loss, keep in ((head, True), (tail, False)):
            loss.backward(retain_graph=keep)
            out.append([p.grad.clone() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_retained_backward_through_a_compiled_graph_gives_eagers_gradients(backend):
    """The head gradient (retain_graph=True), then the tail gradient through the same
    compiled forward, each equal to eager's, over two batches (the second reuses the
    compiled code)."""
    torch._dynamo.reset()
    compiled, eager = head_then_tail_gradients(imbsam.retain_graph_backend(backend)), head_then_tail_gradients(None)
    for got, want in zip(compiled, eager):
        assert max_err(got, want) < 1e-6


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_retained_backward_through_a_graph_recompiled_for_another_batch_size(backend):
    """A smaller batch (an epoch's last) recompiles the graph with the batch size symbolic,
    and that backward is compiled with its forward, not lazily: torch then refused every
    retained backward through it (its donated-buffers check read a list never computed)."""
    torch._dynamo.reset()
    sizes = (16, 5, 16, 7)
    compiled = head_then_tail_gradients(imbsam.retain_graph_backend(backend), batch_sizes=sizes)
    for got, want in zip(compiled, head_then_tail_gradients(None, batch_sizes=sizes)):
        assert max_err(got, want) < 1e-6


@pytest.mark.skipif(not hasattr(torch._functorch.config, "donated_buffer"), reason="torch < 2.5 donates no buffers")
def test_retain_graph_backend_ignores_the_same_graph_cached_with_donated_buffers(monkeypatch, tmp_path):
    """The same forward compiled first by plain inductor (SAM's pattern: it donates its saved
    tensors, and inductor caches its backward under a key that does not say so) must not
    be what ImbSAM's retained backward then runs: that one overwrote saved tensors, and the
    tail gradient came out 0.07 off, silently."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the donating entry is this test's own
    torch._dynamo.reset()
    head_then_tail_gradients("inductor", retain=False)
    torch._dynamo.reset()
    compiled = head_then_tail_gradients(imbsam.retain_graph_backend("inductor"))
    for got, want in zip(compiled, head_then_tail_gradients(None)):
        assert max_err(got, want) < 1e-6


def test_retain_graph_backend_refuses_what_is_not_a_backend():
    with pytest.raises(TypeError, match="backend name or callable"):
        imbsam.retain_graph_backend(3)


TRACES_BACKWARD = hasattr(torch._dynamo.config, "trace_autograd_ops")


@pytest.mark.skipif(not (TRACES_BACKWARD and COMPILES_MUTABLE_LISTS),
                    reason="this torch cannot trace backward() or the ops into a graph")
@pytest.mark.parametrize("method,base,backend,compile_backend,bn_stats", [
    ("imbsam", "sgd", "cpp", "inductor", "update"), ("sam", "adamw", "cpp", "aot_eager", "update"),
    ("imbsam", "adamw", "triton", "aot_eager", "update"), ("imbsam", "sgd", "cpp", "aot_eager", "keep")])
def test_a_whole_fused_step_compiles_into_one_graph_and_trains_as_eager(method, base, backend, compile_backend,
                                                                        bn_stats):
    """imbsam.compile_step: forward, ImbSAM's head/tail backward, the perturbed forward and
    backward and every phase in one graph (fullgraph=True: any graph break would raise),
    recompiled only once, when the optimizer's state first exists; with BatchNorm's
    statistics kept out of the perturbed forward too (frozen_running_stats in the graph)."""
    from torch._dynamo.utils import counters

    from imbsam.train.step import make_step

    from models import batches, small_cnn

    def make():
        model = small_cnn()
        base_cls, kw = (torch.optim.SGD, dict(lr=0.1, momentum=0.9)) if base == "sgd" else (torch.optim.AdamW,
                                                                                            dict(lr=0.01))
        cls = imbsam.ImbSAM if method == "imbsam" else imbsam.SAM
        opt = cls(model.parameters(), base_cls, rho=0.05, backend=backend, **kw)
        return model, opt, make_step(method, model, opt, imbsam.HeadTailLoss([100, 90, 80, 70, 60, 50, 40, 3, 2, 1]),
                                     perturbed_bn_stats=bn_stats)

    (model, opt, step), (eager_model, eager_opt, eager_step) = make(), make()
    torch._dynamo.reset()
    counters.clear()
    step = imbsam.compile_step(step, backend=compile_backend)
    for x, y in batches(4, seed=4):
        loss, _ = step(x, y)
        eager_loss, _ = eager_step(x, y)
        assert abs(loss.item() - eager_loss.item()) < 1e-6
    assert max_err(model.parameters(), eager_model.parameters()) < 1e-6
    assert max_err(model.buffers(), eager_model.buffers()) < 1e-6  # BatchNorm's running statistics
    state = [t for p in model.parameters() for t in opt.state[p].values() if t.dim()]
    eager_state = [t for p in eager_model.parameters() for t in eager_opt.state[p].values() if t.dim()]
    assert len(state) == len(eager_state) > 0 and max_err(state, eager_state) < 1e-6
    assert counters["stats"]["unique_graphs"] <= 2
    assert opt._opt_called  # what LR schedulers read: the compiled phases took the step


def test_compile_step_names_a_torch_that_cannot_trace_backward(monkeypatch):
    monkeypatch.delattr(torch._dynamo.config, "trace_autograd_ops", raising=False)
    with pytest.raises(RuntimeError, match="cannot trace backward\\(\\) into a graph"):
        imbsam.compile_step(lambda x: x)


@pytest.mark.skipif(not (TRACES_BACKWARD and COMPILES_MUTABLE_LISTS),
                    reason="this torch cannot trace backward() or the ops into a graph")
@pytest.mark.parametrize("base,backend", [(torch.optim.RMSprop, "cpp"), (torch.optim.SGD, "reference")])
def test_compile_step_refuses_a_step_it_cannot_fuse_by_name_and_writes_nothing(base, backend):
    """It used to fail inside dynamo ("Could not guard on data-dependent expression", or an
    assertion) with, on some torch, the weights left at w + e and the phase idle."""
    from imbsam.train.step import make_step

    from models import batches, small_cnn

    model = small_cnn()
    opt = imbsam.SAM(model.parameters(), base, rho=0.05, backend=backend, lr=0.01)
    w = [p.detach().clone() for p in model.parameters()]
    torch._dynamo.reset()
    step = imbsam.compile_step(make_step("sam", model, opt), backend="aot_eager")
    (x, y), = batches(1)
    with pytest.raises(imbsam.compiling.StepNotCompilable,
                       match=rf"needs a fused step.*{base.__name__} on {backend}.*Nothing was written.*"
                             r"torch.compile\(model\)"):
        step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w)) and opt._engine.phase == "idle"
    assert max_err(train_compiled("sam", "aot_eager"), train_compiled("sam", None)) < 1e-5  # compiling still works


@pytest.mark.skipif(not (TRACES_BACKWARD and COMPILES_MUTABLE_LISTS),
                    reason="this torch cannot trace backward() or the ops into a graph")
def test_compile_step_under_a_per_step_scheduler_names_the_tensor_lr_and_trains_with_it():
    """A float lr changed at every step recompiled the step until dynamo stopped, at the 9th
    call, with "Hard failure due to fullgraph=True"."""
    from imbsam.train.step import make_step

    from models import batches, small_cnn

    def run(lr):
        model = small_cnn()
        opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend="cpp", lr=lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        step = imbsam.compile_step(make_step("sam", model, opt), backend="aot_eager")
        for x, y in batches(10):
            step(x, y)
            scheduler.step()
        return model

    # At dynamo's default limit and at the one timm.optim sets for the whole process at import
    # (1,000,000: with it a float lr recompiled the step at every step, without a word).
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    for value in (8, 1_000_000):
        torch._dynamo.reset()
        with torch._dynamo.config.patch(**{limit: value}):
            with pytest.raises(RuntimeError, match=r"recompiled until dynamo's limit.*lr=torch.tensor\(0.1\)"):
                run(0.1)
    torch._dynamo.reset()
    assert all(torch.isfinite(p).all() for p in run(torch.tensor(0.1)).parameters())


def train_with_helper(method: str, helper: str, compiled: bool):
    """Three steps of a small BatchNorm CNN (a BN-free one for accumulation), the model
    compiled with aot_eager (ImbSAM's through retain_graph_backend) or not, under one helper:
    "grad scaler" (use_grad_scaler, losses scaled), "accumulation" (2 micro-batches, by
    accumulation_recipes.py) or "frozen bn stats" (frozen_running_stats at w + e)."""
    from test_accumulation import COUNTS, cnn_without_batchnorm

    from imbsam.train.step import make_step

    from accumulation_recipes import RECIPES
    from models import batches, small_cnn

    model = cnn_without_batchnorm() if helper == "accumulation" else small_cnn()
    cls = imbsam.ImbSAM if method == "imbsam" else imbsam.SAM
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    torch._dynamo.reset()
    backend = imbsam.retain_graph_backend("aot_eager") if method == "imbsam" else "aot_eager"
    net = torch.compile(model, backend=backend) if compiled else model
    split = imbsam.HeadTailLoss(COUNTS)
    if helper == "grad scaler":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 6)
        imbsam.use_grad_scaler(opt, scaler)
        if method == "imbsam":
            def step(x, y):
                opt.step(lambda: split(net(x), y))  # step(closure) scales ImbSAM's losses itself
                opt.zero_grad()
                scaler.update()
        else:
            def step(x, y):
                def closure():
                    loss = torch.nn.functional.cross_entropy(net(x), y)
                    scaler.scale(loss).backward()
                    return loss
                opt.step(closure)
                opt.zero_grad()
                scaler.update()
    elif helper == "accumulation":
        recipe = RECIPES["imbsam-graph-by-graph" if method == "imbsam" else "sam"][1]

        def step(x, y):
            recipe(net, list(model.parameters()), opt, split, x, y, 2)
    else:
        step = make_step(method, net, opt, split, perturbed_bn_stats="keep")
    for x, y in batches(3, seed=4):
        step(x, y)
    return [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("helper", ["grad scaler", "accumulation", "frozen bn stats"])
@pytest.mark.parametrize("method", ["sam", "imbsam"])
def test_a_compiled_model_under_each_helper_trains_as_the_eager_one(method, helper):
    assert max_err(train_with_helper(method, helper, compiled=True), train_with_helper(method, helper, False)) < 1e-5


def scaled_step_compiled_and_eager(method: str) -> float:
    """The largest weight difference between a scaled step compiled with graph breaks and
    the eager one, three steps (run by the next test in a fresh interpreter)."""
    from models import batches, small_cnn

    def run(compiled):
        model = small_cnn()
        cls = imbsam.ImbSAM if method == "imbsam" else imbsam.SAM
        opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="cpp")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 6)
        imbsam.use_grad_scaler(opt, scaler)
        split = imbsam.HeadTailLoss([100, 90, 80, 70, 60, 50, 40, 3, 2, 1])

        def step(x, y):
            if method == "imbsam":
                head, tail = split(model(x), y)
                scaler.scale(head).backward(retain_graph=True)
                opt.first_step()
                scaler.scale(tail).backward()
                opt.second_step()
                scaler.scale(split(model(x), y)[1]).backward()
                opt.third_step()
            else:
                scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
                opt.first_step()
                scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
                opt.second_step()
        torch._dynamo.reset()
        backend = imbsam.retain_graph_backend("aot_eager") if method == "imbsam" else "aot_eager"
        step = torch.compile(step, backend=backend) if compiled else step
        for x, y in batches(3, seed=4):
            step(x, y)
            scaler.update()
        return [p.detach().clone() for p in model.parameters()]
    return max_err(run(True), run(False))


@pytest.mark.skipif(not COMPILES_MUTABLE_LISTS, reason="torch < 2.5 cannot compile ops that mutate tensor lists")
@pytest.mark.parametrize("method", ["sam", "imbsam"])
def test_a_compiled_step_with_a_grad_scaler_trains_as_eager(method):
    """torch.compile(step) with graph breaks: compile_step cannot take a GradScaler (torch does
    not trace GradScaler.scale into one graph, and compile_step refuses graph breaks). In a
    fresh interpreter: after a compile_step in the same process, dynamo (torch 2.14.1) fails
    inside the phases of a step compiled with graph breaks ("'forward' not in
    cell_and_freevars"; docs/semantics.md)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, %r); import conftest, test_compile; "
            "print(test_compile.scaled_step_compiled_and_eager(%r))" % (here, method))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=here)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5
    with pytest.raises(ValueError, match=r"fullgraph=True.*use torch.compile\(step\)"):
        imbsam.compile_step(lambda x: x, fullgraph=False)


@pytest.mark.skipif(not (TRACES_BACKWARD and COMPILES_MUTABLE_LISTS),
                    reason="this torch cannot trace backward() or the ops into a graph")
def test_compile_step_with_a_grad_scaler_is_refused_by_dynamo_before_anything_is_written():
    """The helper table's cell: dynamo will not trace GradScaler.scale into one graph, and says
    so at the first call, before any phase has run (plain torch.compile(step) trains instead)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = imbsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="cpp")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    imbsam.use_grad_scaler(opt, scaler)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def step(x, y):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.first_step()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.second_step()

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Exception, match="GradScaler.scale"):
        imbsam.compile_step(step, backend="aot_eager")(x, y)
    assert opt._engine.phase == "idle" and not opt.state
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
