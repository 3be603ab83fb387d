"""The ``scan`` stream stage: byte statistics while the bytes arrive, with optional limits.

One native pass (GIL released) gives the byte histogram, the Shannon entropy of the
object and the lowest and highest entropy of its blocks, the longest run of one byte value
(a zero-filled hole shows up as a long run of 0x00), the line count and UTF-8 validity.
"""

from __future__ import annotations

from typing import Any

from .._exceptions import StageFailed, UsageError
from .._native import scan as _scan
from ._base import ObjectInfo, StreamStage
from ._registry import Option, register, to_bool, to_size


@register(
    "scan",
    {
        "block_size": Option(to_size, "block of the per-block entropy (default 1MiB)"),
        "max_run": Option(int, "fail when one byte value repeats more times in a row"),
        "require_utf8": Option(to_bool, "fail unless the object is valid UTF-8"),
        "min_entropy": Option(float, "fail when the entropy (bits/byte) is lower"),
        "max_entropy": Option(float, "fail when the entropy (bits/byte) is higher"),
    },
    "byte histogram, entropy, longest run, lines, UTF-8 validity; optional limits",
)
class Scan(StreamStage):
    """Byte statistics of the object, failing it on the limits given.

    Result: ``entropy`` (bits per byte, None when empty), ``block_entropy_min`` and
    ``block_entropy_max`` (over blocks of ``block_size``, a final partial block included),
    ``longest_run`` (``{"byte", "length", "offset"}``), ``lines`` (count of ``\\n``),
    ``utf8_valid``, ``first_invalid_utf8`` (offset or None) and ``histogram`` (256 counts).
    """

    name = "scan"

    def __init__(
        self,
        block_size: int = 1 << 20,
        max_run: int | None = None,
        require_utf8: bool = False,
        min_entropy: float | None = None,
        max_entropy: float | None = None,
    ) -> None:
        if block_size <= 0:
            raise UsageError(f"scan block_size must be positive, got {block_size}")
        if max_run is not None and max_run < 0:
            raise UsageError(f"scan max_run must not be negative, got {max_run}")
        for label, value in (("min_entropy", min_entropy), ("max_entropy", max_entropy)):
            if value is not None and not 0.0 <= value <= 8.0:
                raise UsageError(f"scan {label} must be within [0, 8] bits/byte, got {value}")
        if min_entropy is not None and max_entropy is not None and min_entropy > max_entropy:
            raise UsageError(f"scan min_entropy {min_entropy} exceeds max_entropy {max_entropy}")
        self.block_size = block_size
        self.max_run = max_run
        self.require_utf8 = require_utf8
        self.min_entropy = min_entropy
        self.max_entropy = max_entropy
        self._scanner = _scan.Scanner(block_size)
        self._source = "object"

    def start(self, info: ObjectInfo) -> None:
        self._scanner = _scan.Scanner(self.block_size)
        self._source = info.source

    def update(self, view: memoryview) -> None:
        self._scanner.update(view)

    def finish(self) -> dict[str, Any]:
        result: dict[str, Any] = self._scanner.result()
        result.pop("size", None)
        findings = []
        run = result["longest_run"]
        if self.max_run is not None and run["length"] > self.max_run:
            findings.append(
                f"run of {run['length']} bytes 0x{run['byte']:02x} at offset {run['offset']} "
                f"exceeds max_run {self.max_run}"
            )
        if self.require_utf8 and not result["utf8_valid"]:
            findings.append(f"invalid UTF-8 at offset {result['first_invalid_utf8']}")
        entropy = result["entropy"]
        if entropy is not None:
            if self.min_entropy is not None and entropy < self.min_entropy:
                findings.append(f"entropy {entropy:.4f} below min_entropy {self.min_entropy}")
            if self.max_entropy is not None and entropy > self.max_entropy:
                findings.append(f"entropy {entropy:.4f} above max_entropy {self.max_entropy}")
        if findings:
            raise StageFailed(f"{self._source}: {'; '.join(findings)}", result=result)
        return result
