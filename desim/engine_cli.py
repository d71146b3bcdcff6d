"""``--engine fast|reference`` for ``desim run`` and ``desim compare`` (see :mod:`desim.engine`).

The option sets ``$DESIM_ENGINE`` for the duration of the command, so that every replication
(in this process or in the Dask workers it starts) runs on the engine asked for. Both engines give
identical results; ``reference`` is the plain SimPy event loop, kept to check the fast one against.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Iterator

from .engine import DEFAULT_ENGINE, ENGINES


def add_engine_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=list(ENGINES), default=None,
                        help=f"event loop: fast (runs a process on while its own event is next) or reference "
                             f"(plain SimPy); identical results (default: $DESIM_ENGINE, else {DEFAULT_ENGINE})")


@contextlib.contextmanager
def engine_from_args(args: argparse.Namespace) -> Iterator[None]:
    engine = getattr(args, "engine", None)
    if engine is None:
        yield
        return
    old = os.environ.get("DESIM_ENGINE")
    os.environ["DESIM_ENGINE"] = engine
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DESIM_ENGINE", None)
        else:
            os.environ["DESIM_ENGINE"] = old
