"""What writing a temp file costs when the memory it takes was freed a while ago.

    python benches/freepages.py [--size 1GiB] [--gaps 0,3] [--rounds 4] [--dir DIR]

Fills a temp file of ``--size`` in 1 MiB writes through the engine's own ``TempFile``
(0600, sized and preallocated first), removes it, waits ``gap`` seconds, and again,
``--rounds`` times per gap; prints each write's seconds and the machine's free page
reporting (``fastpipe.tools.machine``). On a VM whose balloon reports free memory to
its host, a write after a gap longer than the reporting delay takes the host's faults on
every page; a write right after the removal reuses the pages just freed. A diagnostic,
not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from fastpipe import parse_size
from fastpipe._file import TempFile
from fastpipe.tools.machine import free_page_reporting

CHUNK = 1 << 20


def write_once(folder: str, size: int) -> float:
    """Seconds to fill a new ``size``-byte temp file in ``folder`` (removed after)."""
    block = memoryview(os.urandom(CHUNK))
    fd, path = tempfile.mkstemp(dir=folder, prefix=".freepages-")
    temp = TempFile(fd, path, size)  # the engine's own: 0600, sized, preallocated
    try:
        started = time.perf_counter()
        for offset in range(0, size, CHUNK):
            temp.pwrite(block[: min(CHUNK, size - offset)], offset)
        return time.perf_counter() - started
    finally:
        temp.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--gaps", default="0,3", help="seconds between writes, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dir", default=None, help="where the file goes (default: temp folder)")
    args = parser.parse_args()
    print(f"free page reporting: {free_page_reporting().describe()}")
    for gap in (float(g) for g in args.gaps.split(",")):
        seconds = []
        for _ in range(args.rounds):
            seconds.append(write_once(args.dir or tempfile.gettempdir(), args.size))
            time.sleep(gap)
        # The first write of a gap follows the previous gap's sleep: shown, not special.
        print(f"gap {gap:g} s: " + " ".join(f"{s:.3f}" for s in seconds))


if __name__ == "__main__":
    main()
