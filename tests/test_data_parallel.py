"""SAM and ImbSAM under DistributedDataParallel with ``imbsam.sync_data_parallel``: two CPU
processes (gloo on 127.0.0.1), each with half of every batch, take the step one process
takes on the whole batch; DDP alone leaves ImbSAM's tail gradient local.

All configurations run in one launch of the two ranks (a launch costs seconds); each
rank saves its weights, momentum buffers and how many all-reduces imbsam issued.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import imbsam
from imbsam.train.step import make_step

from accumulation_recipes import RECIPES
from ranks import COUNTS, KW, STEPS, WORLD, batches, mlp, needs_gloo, run_ranks, scaled_imbsam_step

BACKENDS = [b for b in ("reference", "cpp") if b in imbsam.available_backends()]
KINDS = ("sgd", "sam", "asam", "imbsam", "compat imbsam")


def optimizer(kind: str, net: torch.nn.Module, backend: str):
    params = net.parameters()
    if kind == "sgd":
        return torch.optim.SGD(params, **KW)
    if kind == "compat imbsam":  # the paper's own loop and adapter
        return imbsam.compat.ImbSAM(torch.optim.SGD(params, **KW), net, rho=0.5, backend=backend)
    if kind == "imbsam":
        return imbsam.ImbSAM(params, torch.optim.SGD, rho=0.5, backend=backend, **KW)
    return imbsam.SAM(params, torch.optim.SGD, rho=0.5, adaptive=kind == "asam", backend=backend, **KW)


def train(kind: str, backend: str, rank: int = 0, world: int = 1, how: str = "one process") -> dict:
    """Three steps; ``how``: "one process" (whole batches), "ddp" (+ sync_data_parallel),
    "ddp alone", "ddp bucket views", "ddp local" (perturbation="local"), or "hook local":
    the m-sharpness step written by hand (a phase hook averages every phase but the
    perturbation's, without DDP)."""
    model = mlp()
    net = DDP(model, gradient_as_bucket_view=how.startswith("ddp bucket views")) if how.startswith("ddp") else model
    opt = optimizer(kind, net, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if how in SCALED else None
    if how == "ddp scaler before sync":
        imbsam.use_grad_scaler(opt, scaler)
    synced = ("ddp", "ddp bucket views", "ddp local", "ddp no_sync", "ddp scaler before sync", "ddp scaler after sync",
              "ddp tail subset")
    if (how in synced or how in ACCUMULATING) and kind != "sgd":
        imbsam.sync_data_parallel(opt, net, perturbation="local" if how == "ddp local" else "global")
    if how in ("ddp scaler after sync", "one process scaler"):
        imbsam.use_grad_scaler(opt, scaler)
    if how == "hook local":
        def average_but_perturb(phase, params, grads):
            if phase != "perturb":
                for g in grads:
                    dist.all_reduce(g)
                    g.div_(world)
        opt.register_phase_hook(average_but_perturb)
    split = imbsam.HeadTailLoss(COUNTS)
    step = make_step({"asam": "sam", "compat imbsam": "imbsam"}.get(kind, kind), net, opt, split,
                     tail_passes="subset" if how == "ddp tail subset" else "full")
    if how in ACCUMULATING:  # the whole (per-rank) batch as two micro-batches, by a user's recipe
        recipe = RECIPES[ACCUMULATING[how]][1]

        def step(x, y):
            recipe(net, list(model.parameters()), opt, split, x, y, 2)
    if how == "ddp no_sync":  # gradient accumulation: two micro-batches, DDP told not to sync either
        def step(x, y):
            for phase in (opt.first_step, opt.second_step):
                for xs, ys in zip(x.chunk(2), y.chunk(2)):
                    with net.no_sync():
                        (torch.nn.functional.cross_entropy(net(xs), ys) / 2).backward()
                phase(zero_grad=True)
    steps_taken = []
    if scaler is not None:  # the second step's tail gradient overflows on the last rank only: the
        scaled = scaled_imbsam_step(net, opt, split, scaler,  # one imbsam, not DDP, averages
                                    overflow_tail=lambda: len(steps_taken) == 1 and rank == world - 1)

        def step(x, y):
            scaled(x, y)
            steps_taken.append(1)
    for x, y in batches():
        step(x[rank::world], y[rank::world])  # each rank's mean loss; their average is the whole batch's
    base = opt if kind == "sgd" else opt.optimizer if kind == "compat imbsam" else opt.base_optimizer
    return dict(params=[p.detach().clone() for p in model.parameters()],
                buffers=[base.state[p]["momentum_buffer"].clone() for p in model.parameters()],
                scale=None if scaler is None else scaler.get_scale())


# how -> the accumulation recipe (accumulation_recipes.py) each rank runs with 2 micro-batches.
ACCUMULATING = {"ddp accumulate sam": "sam", "ddp accumulate imbsam keeping graphs": "imbsam",
                "ddp accumulate imbsam graph by graph": "imbsam-graph-by-graph",
                "ddp bucket views accumulate imbsam graph by graph": "imbsam-graph-by-graph",
                "ddp accumulate imbsam swapping grads": "imbsam-swapping-grads"}

# With use_grad_scaler registered before or after sync_data_parallel; "one process scaler" is the reference.
SCALED = ("ddp scaler before sync", "ddp scaler after sync", "one process scaler")

CONFIGS = ([(kind, backend, "ddp") for kind in KINDS for backend in BACKENDS]
           + [("imbsam", BACKENDS[-1], how) for how in SCALED[:2]]
           + [("imbsam", backend, "ddp tail subset") for backend in BACKENDS]
           + [(RECIPES[recipe][0], BACKENDS[-1], how) for how, recipe in ACCUMULATING.items()]
           + [("imbsam", BACKENDS[-1], how) for how in ("ddp alone", "ddp bucket views")]
           + [("sam", BACKENDS[-1], "ddp no_sync")]
           + [(kind, BACKENDS[-1], how) for kind in ("sam", "imbsam") for how in ("ddp local", "hook local")])


def _rank(rank: int, world: int, path: str) -> None:
    real_all_reduce, calls = dist.all_reduce, [0]

    def counted(*args, **kwargs):  # imbsam's collectives (DDP's own run in C++, uncounted)
        calls[0] += 1
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    results = {}
    for config in CONFIGS:
        calls[0] = 0
        results[config] = dict(train(*config[:2], rank, world, config[2]), all_reduces=calls[0])
    torch.save(results, path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    paths = run_ranks(_rank, (), str(tmp_path_factory.mktemp("ddp") / "results"), WORLD)
    return [torch.load(path) for path in paths]


def assert_close(got: list, want: list, atol: float = 1e-6) -> None:
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=atol), (a - b).abs().max().item()


def max_diff(got: list, want: list) -> float:
    return max((a - b).abs().max().item() for a, b in zip(got, want))


@needs_gloo
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_ddp_with_sync_takes_the_whole_batch_step(ranks, kind, backend):
    config = (kind, backend, "ddp")
    for key in ("params", "buffers"):
        for a, b in zip(ranks[0][config][key], ranks[1][config][key]):
            assert torch.equal(a, b)  # every rank took the same step
    want = train(kind, backend)
    assert_close(ranks[0][config]["params"], want["params"])
    assert_close(ranks[0][config]["buffers"], want["buffers"])
    # The fewest collectives: DDP averaged SAM's two backward passes and ImbSAM's head and
    # perturbed ones; imbsam all-reduces only ImbSAM's tail gradient, once a step.
    assert ranks[0][config]["all_reduces"] == (STEPS if kind.endswith("imbsam") else 0)


@needs_gloo
@pytest.mark.parametrize("how", list(ACCUMULATING))
def test_ddp_with_sync_and_accumulation_takes_the_whole_batch_step(ranks, how):
    """A recipe of docs/semantics.md under DDP: ImbSAM's graph-by-graph one backpropagates the
    tail first after each forward, so DDP averages the tail's backward and not the head's,
    and imbsam must average the head gradient (it did not before 2026-12-04: the ranks
    ended 0.2 apart)."""
    kind = RECIPES[ACCUMULATING[how]][0]
    config = (kind, BACKENDS[-1], how)
    for a, b in zip(ranks[0][config]["params"], ranks[1][config]["params"]):
        assert torch.equal(a, b)
    want = train(kind, BACKENDS[-1])
    assert_close(ranks[0][config]["params"], want["params"])
    assert_close(ranks[0][config]["buffers"], want["buffers"])
    # One all-reduce a step, by imbsam, for ImbSAM (the tail's or, graph by graph, the head's).
    assert ranks[0][config]["all_reduces"] == (STEPS if kind == "imbsam" else 0)


@needs_gloo
@pytest.mark.parametrize("how", SCALED[:2])
def test_a_scaler_checks_gradients_averaged_over_the_ranks_whichever_helper_came_first(ranks, how):
    """An overflow on one rank skips the step on every rank, as one process skips it. With
    use_grad_scaler registered first, each rank used to check its own gradients: the ranks
    diverged (3e-2) and their scales differed (256 vs 128)."""
    config = ("imbsam", BACKENDS[-1], how)
    want = train("imbsam", BACKENDS[-1], how="one process scaler")
    assert ranks[0][config]["scale"] == ranks[1][config]["scale"] == want["scale"] == 2.0 ** 11  # one step skipped
    for a, b in zip(ranks[0][config]["params"], ranks[1][config]["params"]):
        assert torch.equal(a, b)
    assert_close(ranks[0][config]["params"], want["params"])
    assert_close(ranks[0][config]["buffers"], want["buffers"])


@needs_gloo
@pytest.mark.parametrize("backend", BACKENDS)
def test_imbsams_tail_passes_on_each_ranks_tail_samples_take_the_whole_batch_step(ranks, backend):
    """make_step(tail_passes="subset") under DDP: each rank's tail samples (a different
    number on each, none on some steps) pass outside DDP's wrapper and sync_data_parallel
    averages their gradients; the step is the one process's full-batch ImbSAM step."""
    config = ("imbsam", backend, "ddp tail subset")
    for a, b in zip(ranks[0][config]["params"], ranks[1][config]["params"]):
        assert torch.equal(a, b)
    want = train("imbsam", backend)
    assert_close(ranks[0][config]["params"], want["params"])
    assert_close(ranks[0][config]["buffers"], want["buffers"])


@needs_gloo
def test_ddp_alone_leaves_imbsam_perturbing_with_each_ranks_tail_gradient(ranks):
    """Why sync_data_parallel exists: without it the ranks agree, and are wrong."""
    config = ("imbsam", BACKENDS[-1], "ddp alone")
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][config]["params"], ranks[1][config]["params"]))
    assert max_diff(ranks[0][config]["params"], train("imbsam", BACKENDS[-1])["params"]) > 1e-3


@needs_gloo
def test_gradients_as_bucket_views_leave_the_head_gradient_intact(ranks):
    config = ("imbsam", BACKENDS[-1], "ddp bucket views")
    assert_close(ranks[0][config]["params"], train("imbsam", BACKENDS[-1])["params"])


@needs_gloo
def test_accumulation_under_no_sync_is_averaged_by_imbsam_once_per_phase(ranks):
    """DDP syncs no micro-batch inside no_sync(): imbsam averages what each phase reads."""
    config = ("sam", BACKENDS[-1], "ddp no_sync")
    assert_close(ranks[0][config]["params"], train("sam", BACKENDS[-1])["params"])
    assert ranks[0][config]["all_reduces"] == 2 * STEPS


@needs_gloo
@pytest.mark.parametrize("kind", ["sam", "imbsam"])
def test_local_perturbation_is_m_sharpness(ranks, kind):
    """perturbation="local" is the per-rank perturbation written by hand, and not the global one."""
    local, by_hand = (ranks[0][(kind, BACKENDS[-1], how)] for how in ("ddp local", "hook local"))
    assert_close(local["params"], by_hand["params"])
    assert_close(local["buffers"], by_hand["buffers"])
    assert max_diff(local["params"], train(kind, BACKENDS[-1])["params"]) > 1e-3
    for a, b in zip(ranks[0][(kind, BACKENDS[-1], "ddp local")]["params"],
                    ranks[1][(kind, BACKENDS[-1], "ddp local")]["params"]):
        assert torch.equal(a, b)  # the step itself is still averaged: the ranks agree


def test_sync_data_parallel_refuses_what_it_cannot_sync():
    model = mlp()
    opt = imbsam.ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(TypeError, match="DistributedDataParallel model"):
        imbsam.sync_data_parallel(opt, model)
    with pytest.raises(TypeError, match="an imbsam optimizer"):
        imbsam.sync_data_parallel(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="perturbation='per-rank'; allowed: 'global', 'local'"):
        imbsam.sync_data_parallel(opt, model, perturbation="per-rank")
