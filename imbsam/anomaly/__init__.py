"""The paper's second application: semi-supervised anomaly detection (Deep SAD, Ruff et
al., ICLR 2020) trained with Adam, SAM, ASAM or ImbSAM, the labelled anomalies' loss as
ImbSAM's tail. ``python -m imbsam.anomaly --help``; docs/anomaly.md."""
from __future__ import annotations


def main(argv=None):
    from imbsam.anomaly.config import parser
    from imbsam.anomaly.run import run
    return run(parser().parse_args(argv))
