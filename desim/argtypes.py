"""argparse value types shared by every command line (``desim`` and ``desim kvm``).

Here rather than in :mod:`desim.cli` so that the real-KVM harness (:mod:`desim.kvm.cli`)
can use them without importing the CLI layer above it.
"""
from __future__ import annotations

import argparse
from typing import Callable


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``lo`` (argparse prints the usage and the message on error)."""
    def conv(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {v!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n
    return conv
