"""How long the engine's hand-offs to worker threads take, in one predictability run.

    PYTHONPATH=src python benches/handoffs.py --out OUT --in-flight 4 --repeat 10

Runs ``fastpipe bench --predictability`` with the options given (the same as that
command's: ``--sizes``, ``--repeat``, ``--in-flight``, ``--out``...), with every
``anyio.to_thread.run_sync`` call timed: from the call to the function's start in its
thread (``start``), the function itself (``run``), and from its end to the caller going
on (``return``). The hand-off's two waits are for a core and for the GIL; on a loaded
machine they add to every object's seconds. Prints per function the count and the p50 /
p90 / max of each, in ms. A diagnostic, not a pytest bench: it wraps anyio's function in
this process only.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from typing import Any

import anyio.to_thread

from fastpipe import cli
from fastpipe.tools.predictability import quantile

_ORIGINAL = anyio.to_thread.run_sync
#: function name -> (start, run, return) seconds of each call
_CALLS: dict[str, list[tuple[float, float, float]]] = defaultdict(list)


async def _timed(func: Any, *args: Any, **kwargs: Any) -> Any:
    name = getattr(func, "__qualname__", None) or type(func).__name__
    called = time.perf_counter()
    marks = [0.0, 0.0]

    def inner(*inner_args: Any) -> Any:
        marks[0] = time.perf_counter()
        try:
            return func(*inner_args)
        finally:
            marks[1] = time.perf_counter()

    try:
        return await _ORIGINAL(inner, *args, **kwargs)
    finally:
        if marks[1]:
            _CALLS[name].append(
                (marks[0] - called, marks[1] - marks[0], time.perf_counter() - marks[1])
            )


def main() -> int:
    anyio.to_thread.run_sync = _timed  # type: ignore[assignment]
    code = cli.main(["bench", "--predictability", *sys.argv[1:]])
    print("hand-offs to threads, ms (p50 / p90 / max):")
    for name, calls in sorted(_CALLS.items()):
        parts = []
        for label, i in (("start", 0), ("run", 1), ("return", 2)):
            v = [1e3 * c[i] for c in calls]
            parts.append(f"{label} {quantile(v, 0.5):.1f} / {quantile(v, 0.9):.1f} / {max(v):.1f}")
        print(f"  {name[:40]:40} n={len(calls):4}  " + "  ".join(parts))
    return code


if __name__ == "__main__":
    sys.exit(main())
