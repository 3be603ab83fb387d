"""The ``checksum`` stream stage: a digest of the bytes, optionally compared with a value."""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from .._exceptions import StageFailed, UsageError
from ._base import ObjectInfo, StreamStage
from ._registry import Option, register

ALGORITHMS = ("xxh3_64", "xxh3_128", "sha256", "sha1", "md5", "crc32c", "crc32")


class _Hasher(Protocol):
    def update(self, data: memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str) -> _Hasher:
    """Return a fresh hasher for one of :data:`ALGORITHMS`."""
    if algorithm in ("xxh3_64", "xxh3_128"):
        import xxhash

        return xxhash.xxh3_64() if algorithm == "xxh3_64" else xxhash.xxh3_128()
    if algorithm in ("sha256", "sha1", "md5"):
        return hashlib.new(algorithm)
    if algorithm in ("crc32c", "crc32"):
        from .verify import new_digest  # the CRCs S3 stores, computed the same way

        digest = new_digest(algorithm.upper())
        assert digest is not None  # CRC32 and CRC32C need no optional package
        return digest  # type: ignore[return-value]
    raise UsageError(f"unknown checksum algorithm {algorithm!r}; accepted: {', '.join(ALGORITHMS)}")


def _hexdigest(hasher: _Hasher) -> str:
    digest = hasher.hexdigest()
    return digest.decode() if isinstance(digest, bytes) else digest


@register(
    "checksum",
    {
        "algo": Option(str, f"one of {', '.join(ALGORITHMS)} (default xxh3_128)"),
        "expect": Option(str, "expected hex digest; a mismatch fails the stage"),
    },
    "digest of the bytes while they arrive; optional expected value",
)
class Checksum(StreamStage):
    """Digest the object's bytes (xxh3_64, xxh3_128, sha256, sha1, md5, crc32c, crc32).

    With ``expect``, a different digest fails the stage; without it the digest is only
    computed, and nothing is verified (see ``verify`` for what S3 stored). Result:
    ``{"algorithm": ..., "hexdigest": ...}`` (plus ``"expected"`` when given).
    """

    name = "checksum"

    def __init__(self, algo: str = "xxh3_128", expect: str | None = None) -> None:
        algo = algo.lower().replace("-", "_")
        if algo not in ALGORITHMS:
            raise UsageError(
                f"unknown checksum algorithm {algo!r}; accepted: {', '.join(ALGORITHMS)}"
            )
        self.algorithm = algo
        self.expect = expect.strip().lower() if expect else None
        if self.expect is not None:
            try:
                bytes.fromhex(self.expect)
            except ValueError:
                raise UsageError(f"checksum expect is not hex: {expect!r}") from None
        self._hasher: _Hasher = new_hasher(algo)
        self._source = "object"

    def start(self, info: ObjectInfo) -> None:
        self._hasher = new_hasher(self.algorithm)
        self._source = info.source

    def update(self, view: memoryview) -> None:
        self._hasher.update(view)

    def cost_key(self, info: ObjectInfo | None = None) -> str:
        """``checksum:<algorithm>``: the algorithm sets the cost."""
        return f"checksum:{self.algorithm}"

    def verified(self, result: Any) -> str | None:
        """``sha256 against the expected value`` with ``expect``; None without."""
        if self.expect is None:
            return None
        return f"{self.algorithm} against the expected value"

    def finish(self) -> dict[str, Any]:
        digest = _hexdigest(self._hasher)
        result: dict[str, Any] = {"algorithm": self.algorithm, "hexdigest": digest}
        if self.expect is not None:
            result["expected"] = self.expect
            if digest != self.expect:
                raise StageFailed(
                    f"{self._source}: {self.algorithm} mismatch: expected {self.expect}, "
                    f"the bytes give {digest}",
                    result=result,
                )
        return result
