"""How far a compiled model's gradients are from exact, ImbSAM's retained backward beside
one plain backward, so that a difference from eager is put where it belongs.

    python scripts/compiled_gradients.py [--model resnet32] [--batches 3] [--out results/compile]

For each batch, the head and tail gradients of ImbSAM's recipe (head with
``retain_graph=True``, then tail, through one forward) are taken in four ways: eager in
float64 (the exact value), eager in float32, inductor through
``imbsam.retain_graph_backend()``, and, for head + tail, plain inductor with a single
backward (no retained graph). Each float32 way's largest error against float64 is
printed and written to ``OUT/compiled_gradients_<model>.json``: if the retained graph
were at fault, its errors would exceed those of the single backward on the same graph.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import imbsam
from imbsam.train.models import build_model

# tf32 off, as the tests run: the errors then belong to float32 itself.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
COUNTS = [100, 90, 80, 70, 60, 50, 40, 3, 2, 1]


def gradients(model_name: str, n_batches: int, dtype, compile_backend=None, retained: bool = True):
    """[(head grads, tail grads) or (None, head+tail grads)] per batch, as float64."""
    torch.manual_seed(0)
    model = build_model(model_name, len(COUNTS), 1).to(dtype)
    net = torch.compile(model, backend=compile_backend) if compile_backend is not None else model
    split = imbsam.HeadTailLoss(COUNTS)
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n_batches):
        x, y = torch.randn(8, 1, 28, 28, generator=gen).to(dtype), torch.randint(0, len(COUNTS), (8,), generator=gen)
        head, tail = split(net(x).float(), y)
        grads = []
        for loss, retain in (((head, True), (tail, False)) if retained else ((head + tail, False),)):
            loss.backward(retain_graph=retain)
            grads.append([p.grad.double() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
        out.append(tuple(grads) if retained else (None, grads[0]))
    return out


def largest_error(got, exact) -> float:
    return max((g - e).abs().max().item() for g, e in zip(got, exact))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--out", default="results/compile")
    args = parser.parse_args()

    exact = gradients(args.model, args.batches, torch.float64)
    eager = gradients(args.model, args.batches, torch.float32)
    torch._dynamo.reset()
    retained = gradients(args.model, args.batches, torch.float32, imbsam.retain_graph_backend("inductor"))
    torch._dynamo.reset()
    single = gradients(args.model, args.batches, torch.float32, "inductor", retained=False)

    rows = []
    print(f"{args.model}: largest gradient error against float64 eager (float32 everywhere else)")
    print(f"{'batch':>5} {'gradient':>9} {'largest':>9} {'eager':>10} {'retained':>10} {'single':>10}")
    for b in range(args.batches):
        (h64, t64), (h, t), (hr, tr) = exact[b], eager[b], retained[b]
        sum64 = [a + c for a, c in zip(h64, t64)]
        cases = {"head": (h64, h, hr, None), "tail": (t64, t, tr, None),
                 "head+tail": (sum64, [a + c for a, c in zip(h, t)], [a + c for a, c in zip(hr, tr)], single[b][1])}
        for name, (ex, e, r, s) in cases.items():
            row = dict(batch=b, gradient=name, largest=max(g.abs().max().item() for g in ex),
                       eager=largest_error(e, ex), retained=largest_error(r, ex),
                       single=None if s is None else largest_error(s, ex))
            rows.append(row)
            single_text = "-" if row["single"] is None else f"{row['single']:.2e}"
            print(f"{b:>5} {name:>9} {row['largest']:>9.3f} {row['eager']:>10.2e} {row['retained']:>10.2e} "
                  f"{single_text:>10}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(model=args.model, batches=args.batches, torch=torch.__version__, python=platform.python_version(),
                  machine=platform.processor() or platform.machine(), date=datetime.now(timezone.utc).isoformat(),
                  command=" ".join(["python"] + sys.argv), rows=rows)
    path = out / f"compiled_gradients_{args.model}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # atomic: a reader never sees half a file
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
