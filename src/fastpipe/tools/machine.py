"""What the benches record about the machine they ran on.

Besides the CPU and Python: free page reporting, whether this virtual machine hands freed
memory back to its host. A guest kernel with a virtio balloon that has free page
reporting tells the host about blocks of memory that have stayed free for a while
(``page_reporting``), and the host drops them. A page taken back after that costs a
fault on the host. Temp files go through the page cache: each object's file takes pages,
and its removal frees them. So on such a VM an object whose pages were freed long enough
ago writes slower than one that reuses pages freed a moment before, and the end-to-end
times of the benches spread with it (measured in the README's "Predictable time"). The
benches record what this reads and say so when it is on.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

#: The virtio device id of a memory balloon, and its free page reporting feature bit.
BALLOON_DEVICE = 0x0005
REPORTING_FEATURE = 5


@dataclass(frozen=True)
class FreePageReporting:
    """What the kernel says about free page reporting (each None when it says nothing)."""

    #: A virtio balloon that negotiated free page reporting is bound: freed memory goes
    #: back to the host.
    active: bool
    #: ``page_reporting_order``: the smallest free block reported is 2**order pages.
    order: int | None = None
    #: ``min_free_ms``, on kernels that have it: how long a block stays free before it is
    #: reported (mainline kernels wait about 2 s and have no such setting).
    delay_ms: int | None = None

    def describe(self) -> dict[str, Any]:
        """As a JSON-ready dict (what the benches record)."""
        return asdict(self)

    def note(self) -> str | None:
        """One line for a bench's output when freed memory goes back to the host, else
        None."""
        if not self.active:
            return None
        after = "about 2 s" if self.delay_ms is None else f"{self.delay_ms} ms"
        return (
            f"note: this VM hands memory that stayed free for {after} back to its host "
            "(virtio-balloon free page reporting): temp-file pages taken back after that "
            "cost host faults, and end-to-end times spread with them (README: Predictable "
            "time)"
        )


def free_page_reporting(sys_root: str = "/sys") -> FreePageReporting:
    """Read free page reporting from ``sys_root`` (``/sys``); not active when a file is
    missing or unreadable (not Linux, no balloon)."""
    active = False
    devices = os.path.join(sys_root, "bus", "virtio", "devices")
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(devices)):
            if _balloon_reports(os.path.join(devices, name)):
                active = True
                break
    params = os.path.join(sys_root, "module", "page_reporting", "parameters")
    return FreePageReporting(
        active=active,
        order=_read_int(os.path.join(params, "page_reporting_order")),
        delay_ms=_read_int(os.path.join(params, "min_free_ms")),
    )


def _balloon_reports(device: str) -> bool:
    """A virtio balloon, bound to its driver, that negotiated free page reporting."""
    if _read_int(os.path.join(device, "device"), base=16) != BALLOON_DEVICE:
        return False
    if not os.path.exists(os.path.join(device, "driver")):
        return False
    try:
        with open(os.path.join(device, "features"), encoding="ascii") as f:
            features = f.read().strip()  # one character per feature bit, bit 0 first
    except OSError:
        return False
    return len(features) > REPORTING_FEATURE and features[REPORTING_FEATURE] == "1"


def _read_int(path: str, base: int = 10) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip(), base)
    except (OSError, ValueError):
        return None


def machine_info(reporting: FreePageReporting | None = None) -> dict[str, Any]:
    """The CPU, platform, Python and free page reporting (``reporting`` when the caller
    already read it for its note, else read now), for a bench's record."""
    model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "free_page_reporting": (reporting or free_page_reporting()).describe(),
    }
