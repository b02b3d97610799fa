"""Long-tailed training: ``python -m imbsam.train --help``."""
from imbsam.train.config import parser
from imbsam.train.run import run

__all__ = ["parser", "run", "main"]


def main(argv=None):
    return run(parser().parse_args(argv))
