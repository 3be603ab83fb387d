"""anyio helpers: the one error a caller should see out of a task group's exception
group, and the event loop runner."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import anyio

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


T = TypeVar("T")


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` on asyncio, with uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(fn, backend="asyncio", backend_options=options)
