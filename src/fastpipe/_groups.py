"""anyio helpers: the one error a caller should see out of a task group's exception
group, a lock held until released once, and the event loop runner."""

from __future__ import annotations

import sys
import time
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


class HeldOnce:
    """Holds a lock from ``async with`` until :meth:`release` or the block's end (no
    lock: holds nothing)."""

    def __init__(self, lock: anyio.Lock | None) -> None:
        self.lock = lock
        self.held = False
        #: Seconds spent waiting for the lock (an object's admission wait).
        self.waited = 0.0

    async def __aenter__(self) -> HeldOnce:
        if self.lock is not None:
            started = time.perf_counter()
            await self.lock.acquire()
            self.waited = time.perf_counter() - started
            self.held = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self.held and self.lock is not None:
            self.held = False
            self.lock.release()


T = TypeVar("T")


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` on asyncio, with uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(fn, backend="asyncio", backend_options=options)
