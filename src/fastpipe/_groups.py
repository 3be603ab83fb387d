"""Unwrap anyio task-group exception groups into the one error a caller should see."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

if sys.version_info < (3, 11):  # pragma: no cover - anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def first_error(group: BaseException) -> BaseException:
    """The most telling error in ``group``: a fastpipe error first, then any other.

    Cancellations and KeyboardInterrupt keep their meaning: if one is all there is, it is
    returned as is.
    """
    from ._exceptions import FastpipeError

    leaves = list(_leaves(group))
    for kind in (FastpipeError, Exception):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0] if leaves else group


@contextmanager
def unwrap_groups() -> Iterator[None]:
    """Re-raise an exception group's most telling error on its own."""
    try:
        yield
    except BaseExceptionGroup as group:
        error = first_error(group)
        if error is group:
            raise
        # The group only wraps this error: hide it, but keep the error's own cause (a bare
        # "from None" here erased the cause of every error raised inside a task group).
        raise error from error.__cause__
