"""Readable progress on stderr: one line per stage with its duration."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

from encdec.errors import printable

log = logging.getLogger("encdec")


def secondary_rank() -> str | None:
    """The RANK of a process of a distributed run other than the first (as torchrun and accelerate set it); None
    for the first, or for a process running alone (a RANK left in a shell: it runs alone, as distributed.init
    takes it)."""
    rank = os.environ.get("RANK", "0")
    return rank if rank not in ("", "0") and os.environ.get("WORLD_SIZE", "1") not in ("", "1") else None


class _Printable(logging.Formatter):
    """Lines with their control characters escaped (`errors.printable`): a handed file's names are logged too."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))


def setup(verbose: bool = False) -> None:
    """encdec's lines on stderr. In a process of a distributed run other than the first (`secondary_rank`) warnings
    only, marked with its rank: every process said each stage (8 GPUs, 8 times)."""
    rank = secondary_rank()
    other = rank is not None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Printable(f"encdec (rank {rank}): %(message)s" if other else "encdec: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if other else logging.INFO)
    log.propagate = False
    import transformers

    transformers.logging.set_verbosity_error()  # its load reports are noise for our users
    transformers.logging.disable_progress_bar()


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)
