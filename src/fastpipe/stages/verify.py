"""The ``verify`` stream stage: the downloaded bytes against what S3 stored.

One pass over the bytes as they arrive, no second read. In order of preference it checks
a full-object checksum (``x-amz-checksum-*``), a composite checksum of a multipart upload
(``<base64>-N``: the checksum of the parts' checksums), or the ETag (an MD5 for a
single-part upload, the MD5 of the parts' MD5s plus ``-N`` for a multipart one). Part
boundaries come from ``info.multipart_part_size`` (HEAD ``PartNumber=1``): every part but
the last has that size, as every common uploader does.

MD5 (about 0.65-0.9 GB/s) is the slowest digest here, so a multipart ETag is hashed in
parallel: each part's bytes are copied into a bounded pool of buffers and hashed by a few
lane threads (hashlib releases the GIL), part ``k`` on lane ``k % lanes``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import queue
import threading
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .._exceptions import StageFailed, UsageError
from .._s3meta import CHECKSUM_ALGORITHMS, COMPOSITE_CHECKSUM, MD5_ETAG, MULTIPART_ETAG, strip_etag
from ._base import ObjectInfo, StreamStage
from ._registry import Option, register, to_bool

#: Bytes copied at a time into one buffer handed to a hashing lane.
LANE_CHUNK = 1 << 20
#: Upper bound of the buffers held for the hashing lanes, whatever the part size.
LANE_MAX_BUFFERED = 32 << 20


class _Digest(Protocol):
    def update(self, data: memoryview, /) -> object: ...
    def digest(self) -> bytes: ...


class Crc:
    """A CRC function ``f(data, previous) -> int`` behind the hashlib interface."""

    def __init__(self, function: Callable[[Any, int], int], width: int) -> None:
        self._function = function
        self._width = width
        self._crc = 0

    def update(self, data: memoryview) -> None:
        self._crc = self._function(data, self._crc)

    def digest(self) -> bytes:
        return self._crc.to_bytes(self._width, "big")

    def hexdigest(self) -> str:
        return self.digest().hex()


def _awscrt_checksums() -> Any:
    """The ``awscrt.checksums`` module, or None when awscrt is not installed."""
    try:
        from awscrt import checksums
    except ImportError:
        return None
    return checksums


def new_digest(algorithm: str) -> _Digest | None:
    """A fresh digest for an S3 algorithm name (or ``MD5``); None when it cannot be computed.

    CRC64NVME needs ``awscrt``; CRC32C uses it too when present (it takes memoryviews
    without a copy and runs at about 20 GB/s), else the ``crc32c`` package.
    """
    if algorithm in ("MD5", "SHA1", "SHA256"):
        return hashlib.new(algorithm.lower(), usedforsecurity=False)
    if algorithm == "CRC32":
        return Crc(zlib.crc32, 4)
    crt = _awscrt_checksums()
    if algorithm == "CRC32C":
        if crt is not None:
            return Crc(crt.crc32c, 4)
        import crc32c

        return Crc(crc32c.crc32c, 4)
    if algorithm == "CRC64NVME" and crt is not None:
        return Crc(crt.crc64nvme, 8)
    return None


def part_count(size: int, part_size: int) -> int:
    """Parts of ``part_size`` bytes (the last shorter) that make ``size`` bytes."""
    return max(1, math.ceil(size / part_size))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class _Plan:
    """How one object is verified."""

    method: str
    #: Algorithm of the digest over the bytes (``MD5``, ``CRC32C``, ...).
    algorithm: str
    #: The value compared with, as S3 spells it (base64, ``base64-N``, ETag).
    expected: str
    #: Part size for the composite and multipart methods; None for a whole-object digest.
    part_size: int | None = None
    parts: int | None = None


def _normalize_checksum(value: str, algorithm: str) -> str:
    """Accept a checksum override in base64 (as S3) or hex; return base64."""
    probe = new_digest(algorithm)
    width = len(probe.digest()) if probe is not None else 0
    text = value.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if width and len(raw) == width and len(text) == 2 * width:
        return _b64(raw)
    return text


def _multipart_plan(info: ObjectInfo, parts: int, what: str) -> tuple[int | None, str | None]:
    """Part size for an object said to have ``parts`` parts, or the reason it is unknown."""
    part_size = info.multipart_part_size
    if not part_size:
        return None, f"{what} has {parts} parts but the part size is unknown"
    if info.parts_count is not None and info.parts_count != parts:
        return None, f"{what} says {parts} parts, HEAD says {info.parts_count}"
    if part_count(info.size, part_size) != parts:
        return None, (
            f"{what} has {parts} parts, which {info.size} bytes in parts of "
            f"{part_size} bytes cannot make (parts of unequal sizes)"
        )
    return part_size, None


def choose_plan(
    info: ObjectInfo, expected: str | None = None, use_etag: bool = True
) -> _Plan | list[str]:
    """Pick the strongest check ``info`` allows, or return why nothing can be verified.

    ``expected`` replaces the stored value of the chosen method; without any stored value
    it is read as an ETag (MD5 hex, or ``<hex>-N`` with a known part size). With
    ``use_etag=False`` only stored checksums are used (an MD5 costs far more than a CRC).
    """
    reasons: list[str] = []
    checksums = {k.upper(): v.strip() for k, v in info.checksums.items()}
    ctype = (info.checksum_type or "").upper() or None
    plan = None
    if ctype in (None, "FULL_OBJECT"):
        plan = _full_object_plan(checksums, expected, reasons)
    if plan is None and ctype in (None, "COMPOSITE"):
        plan = _composite_plan(info, checksums, expected, reasons)
    if plan is None:
        plan = _etag_plan(info, checksums, expected, use_etag, reasons)
    return reasons if plan is None else plan


def _full_object_plan(
    checksums: dict[str, str], expected: str | None, reasons: list[str]
) -> _Plan | None:
    """A stored whole-object checksum to compare with (the first usable one), else None."""
    for name in CHECKSUM_ALGORITHMS:
        value = checksums.get(name)
        if value is None or COMPOSITE_CHECKSUM.match(value):
            continue
        if new_digest(name) is None:
            reasons.append(f"{name} checksum needs awscrt (pip install awscrt)")
            continue
        stored = _normalize_checksum(expected, name) if expected else value
        return _Plan(f"checksum-{name.lower()}", name, stored)
    return None


def _composite_plan(
    info: ObjectInfo, checksums: dict[str, str], expected: str | None, reasons: list[str]
) -> _Plan | None:
    """A stored composite (per-part) checksum to compare with, else None."""
    for name in CHECKSUM_ALGORITHMS:
        m = COMPOSITE_CHECKSUM.match(checksums.get(name, ""))
        if not m:
            continue
        if new_digest(name) is None:
            reasons.append(f"{name} checksum needs awscrt (pip install awscrt)")
            continue
        parts = int(m.group(2))
        part_size, why = _multipart_plan(info, parts, f"composite {name} checksum")
        if part_size is None:
            reasons.append(str(why))
            continue
        stored = checksums[name]
        if expected:
            value, _, suffix = expected.strip().rpartition("-")
            stored = (
                f"{_normalize_checksum(value, name)}-{suffix}"
                if value and suffix.isdigit()
                else expected.strip()
            )
        return _Plan(f"composite-{name.lower()}", name, stored, part_size, parts)
    return None


def _etag_plan(
    info: ObjectInfo,
    checksums: dict[str, str],
    expected: str | None,
    use_etag: bool,
    reasons: list[str],
) -> _Plan | None:
    """The ETag (single or multipart MD5) to compare with, else None."""
    if not use_etag:
        if info.etag or expected:
            reasons.append("no stored checksum, and the ETag (an MD5) is not checked (etag=false)")
        else:
            reasons.append("no stored checksum and no ETag")
        return None
    etag = (strip_etag(info.etag) or "").lower()
    if expected and not etag:
        etag = expected.strip().lower()
    if MD5_ETAG.match(etag):
        return _Plan("etag-md5", "MD5", expected.strip().lower() if expected else etag)
    m = MULTIPART_ETAG.match(etag)
    if m:
        parts = int(m.group(2))
        part_size, why = _multipart_plan(info, parts, f"multipart ETag {etag}")
        if part_size is not None:
            stored = expected.strip().lower() if expected else etag
            return _Plan("etag-multipart-md5", "MD5", stored, part_size, parts)
        reasons.append(str(why))
    elif etag:
        reasons.append(f"ETag {etag!r} is not an MD5 (encrypted object or another server)")
    if not info.etag and not checksums and not expected:
        reasons.append("no stored checksum and no ETag")
    return None


def _lane_main(
    work: queue.SimpleQueue[tuple[_Digest, bytearray, int] | None],
    free: queue.SimpleQueue[bytearray],
    errors: list[BaseException],
) -> None:
    while True:
        item = work.get()
        if item is None:
            return
        digest, buffer, length = item
        try:
            with memoryview(buffer) as view:
                digest.update(view[:length])
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            errors.append(exc)
        finally:
            free.put(buffer)


def _stop_lanes(queues: list[queue.SimpleQueue[Any]]) -> None:
    for q in queues:
        q.put(None)


class _Lanes:
    """Threads that hash copied chunks; a part always goes to the same lane, in order.

    Memory: at most ``max_buffers`` buffers of :data:`LANE_CHUNK` bytes, allocated on
    demand. A lane set that is dropped without :meth:`close` (the engine abandoned the
    object) stops its threads when garbage-collected.
    """

    def __init__(self, lanes: int, max_buffers: int) -> None:
        self._work: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in range(lanes)]
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._allocated = 0
        self._max_buffers = max(max_buffers, 2)
        self.errors: list[BaseException] = []
        self._threads = [
            threading.Thread(
                target=_lane_main,
                args=(work, self._free, self.errors),
                name=f"fastpipe-verify-lane-{i}",
                daemon=True,
            )
            for i, work in enumerate(self._work)
        ]
        for thread in self._threads:
            thread.start()
        self._stop = weakref.finalize(self, _stop_lanes, self._work)

    def buffer(self) -> bytearray:
        """A free buffer; blocks while every allowed buffer is being hashed."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._allocated < self._max_buffers:
                self._allocated += 1
                return bytearray(LANE_CHUNK)
            return self._free.get()

    def submit(self, lane: int, digest: _Digest, buffer: bytearray, length: int) -> None:
        self._work[lane % len(self._work)].put((digest, buffer, length))

    def close(self) -> None:
        """Let the lanes finish what was submitted, then stop them."""
        self._stop()
        for thread in self._threads:
            thread.join()


class _PartDigests:
    """The digest of each part of a stream cut into ``part_size`` pieces (last shorter)."""

    def __init__(self, algorithm: str, part_size: int, lanes: int) -> None:
        self._algorithm = algorithm
        self._part_size = part_size
        self._parts: list[_Digest] = []
        self._current = self._new()
        self._left = part_size
        self._lanes: _Lanes | None = None
        if lanes > 1:
            chunks_per_part = math.ceil(part_size / LANE_CHUNK)
            wanted = lanes * chunks_per_part + lanes
            self._lanes = _Lanes(lanes, min(wanted, LANE_MAX_BUFFERED // LANE_CHUNK))
        self._buffer: bytearray | None = None
        self._fill = 0

    def _new(self) -> _Digest:
        digest = new_digest(self._algorithm)
        assert digest is not None
        return digest

    def update(self, view: memoryview) -> None:
        while len(view):
            take = min(len(view), self._left)
            piece = view[:take] if take < len(view) else view
            if self._lanes is None:
                self._current.update(piece)
            else:
                self._copy(piece)
            self._left -= take
            if self._left == 0:
                self._end_part()
            if take == len(view):
                return
            view = view[take:]

    def _copy(self, piece: memoryview) -> None:
        assert self._lanes is not None
        offset = 0
        while offset < len(piece):
            if self._buffer is None:
                self._buffer = self._lanes.buffer()
                self._fill = 0
            n = min(len(piece) - offset, LANE_CHUNK - self._fill)
            self._buffer[self._fill : self._fill + n] = piece[offset : offset + n]
            self._fill += n
            offset += n
            if self._fill == LANE_CHUNK:
                self._flush()

    def _flush(self) -> None:
        if self._buffer is not None and self._lanes is not None:
            self._lanes.submit(len(self._parts), self._current, self._buffer, self._fill)
        self._buffer = None
        self._fill = 0

    def _end_part(self) -> None:
        self._flush()
        self._parts.append(self._current)
        self._current = self._new()
        self._left = self._part_size

    def digests(self) -> list[bytes]:
        """Finish the last part and return every part's digest, in order."""
        if self._left < self._part_size or not self._parts:
            self._end_part()
        self.close()
        return [d.digest() for d in self._parts]

    def close(self) -> None:
        if self._lanes is not None:
            self._lanes.close()
            errors, self._lanes = self._lanes.errors, None
            if errors:
                raise errors[0]


def _default_lanes() -> int:
    return min(4, os.cpu_count() or 1)


@register(
    "verify",
    {
        "strict": Option(to_bool, "fail when nothing can be verified (default false)"),
        "expected": Option(str, "value to compare with instead of the one S3 stored"),
        "lanes": Option(int, "threads hashing multipart parts in parallel (default: cores, max 4)"),
        "etag": Option(
            to_bool,
            "fall back to the ETag (MD5, costly) when S3 stored no checksum (default true)",
        ),
    },
    "compare the bytes with S3's stored checksum or ETag (multipart included)",
)
class Verify(StreamStage):
    """Check the downloaded bytes against what S3 stored, in the single stream pass.

    Preference: a full-object checksum from ``info.checksums`` (CRC64NVME, CRC32C, CRC32,
    SHA1, SHA256), then a composite checksum (``<base64>-N``), then the ETag (MD5, or the
    multipart MD5-of-MD5s ``<hex>-N``). Composite and multipart checks cut the bytes at
    ``info.multipart_part_size``. When nothing can be checked (an ETag that is not an MD5,
    an unknown part size, parts of unequal sizes) the method is ``unverifiable``: the stage
    passes, unless ``strict`` (then it fails before any byte is fetched).

    ``expected`` replaces the stored value (base64 or hex for checksums, hex for ETags);
    with no stored value at all it is read as an ETag. ``etag=False`` checks stored
    checksums only (the default stage list runs ``Verify(etag=False)``: a CRC costs
    little, an MD5 of the whole object a lot).

    Result: ``{"method", "expected", "actual"}``, method one of ``checksum-<algo>``,
    ``composite-<algo>``, ``etag-md5``, ``etag-multipart-md5``, ``unverifiable``; plus
    ``part_size`` for the composite and multipart methods and ``reason`` (a list of
    strings) when unverifiable. A mismatch fails with that result.
    """

    name = "verify"

    def __init__(
        self,
        strict: bool = False,
        expected: str | None = None,
        lanes: int | None = None,
        etag: bool = True,
    ) -> None:
        self.strict = strict
        self.etag = etag
        self.expected = expected.strip() if expected else None
        if lanes is not None and lanes < 1:
            raise UsageError(f"verify lanes must be at least 1, not {lanes}")
        self.lanes = lanes
        self._info: ObjectInfo | None = None
        self._plan: _Plan | list[str] = []
        self._whole: _Digest | None = None
        self._parts: _PartDigests | None = None
        self._received = 0

    def cost_key(self, info: ObjectInfo | None = None) -> str:
        """``verify:<algorithm>`` (``crc32c``, ``md5``...), ``-lanes`` when parts are hashed
        in parallel, ``verify:none`` when nothing can be checked. Without ``info`` the
        likely case: an ETag's MD5 with ``etag=true``, else a CRC32 (what recent SDKs
        store)."""
        if info is None:
            return "verify:md5" if self.etag else "verify:crc32"
        plan = choose_plan(info, self.expected, self.etag)
        if not isinstance(plan, _Plan):
            return "verify:none"
        key = f"verify:{plan.algorithm.lower()}"
        lanes = self.lanes if self.lanes is not None else _default_lanes()
        if (
            plan.part_size is not None
            and plan.algorithm in ("MD5", "SHA1", "SHA256")
            and (plan.parts or 1) >= 2
            and lanes > 1
        ):
            key += "-lanes"
        return key

    def check_info(self, info: ObjectInfo) -> None:
        """With ``strict``, reject an object that cannot be verified before fetching it."""
        plan = choose_plan(info, self.expected, self.etag)
        if self.strict and not isinstance(plan, _Plan):
            raise StageFailed(
                f"{info.source}: cannot be verified ({'; '.join(plan)}) and verify is strict",
                result=self._unverifiable(plan),
            )

    def start(self, info: ObjectInfo) -> None:
        if self._parts is not None:
            parts, self._parts = self._parts, None
            with contextlib.suppress(Exception):  # an abandoned object's error is moot
                parts.close()
        self._info = info
        self._received = 0
        self._whole = self._parts = None
        self._plan = plan = choose_plan(info, self.expected, self.etag)
        if not isinstance(plan, _Plan):
            return
        if plan.part_size is None:
            self._whole = new_digest(plan.algorithm)
        else:
            lanes = self.lanes if self.lanes is not None else _default_lanes()
            if plan.algorithm not in ("MD5", "SHA1", "SHA256") or (plan.parts or 1) < 2:
                lanes = 1  # CRCs run at memory speed: copies would cost more than they save
            self._parts = _PartDigests(plan.algorithm, plan.part_size, lanes)

    def update(self, view: memoryview) -> None:
        self._received += len(view)
        if self._whole is not None:
            self._whole.update(view)
        elif self._parts is not None:
            self._parts.update(view)

    def verified(self, result: Any) -> str | None:
        """``checksum-crc32c against the value S3 stored`` style; None when unverifiable."""
        if not isinstance(result, dict) or result.get("method") in (None, "unverifiable"):
            return None
        origin = "the value given" if self.expected else "the value S3 stored"
        return f"{result['method']} against {origin}"

    @staticmethod
    def _unverifiable(reasons: list[str]) -> dict[str, Any]:
        return {"method": "unverifiable", "expected": None, "actual": None, "reason": reasons}

    def _actual(self, plan: _Plan) -> str:
        if self._whole is not None:
            raw = self._whole.digest()
            return raw.hex() if plan.algorithm == "MD5" else _b64(raw)
        assert self._parts is not None
        digests = self._parts.digests()
        self._parts = None
        combined = new_digest(plan.algorithm)
        assert combined is not None
        combined.update(memoryview(b"".join(digests)))
        raw = combined.digest()
        value = raw.hex() if plan.algorithm == "MD5" else _b64(raw)
        return f"{value}-{len(digests)}"

    def finish(self) -> dict[str, Any]:
        info = self._info if self._info is not None else ObjectInfo("object", self._received)
        plan = self._plan
        if not isinstance(plan, _Plan):
            if self.strict:
                raise StageFailed(
                    f"{info.source}: cannot be verified ({'; '.join(plan)}) and verify is strict",
                    result=self._unverifiable(plan),
                )
            return self._unverifiable(plan)
        actual = self._actual(plan)
        result: dict[str, Any] = {
            "method": plan.method,
            "expected": plan.expected,
            "actual": actual,
        }
        if plan.part_size is not None:
            result["part_size"] = plan.part_size
        if self._received != info.size:
            raise StageFailed(
                f"{info.source}: received {self._received} bytes, HEAD said {info.size}",
                result=result,
            )
        if not _same(plan, actual):
            origin = "given" if self.expected else "S3 stored"
            layout = (
                f" (parts of {plan.part_size} bytes, the last shorter)"
                if plan.part_size is not None
                else ""
            )
            raise StageFailed(
                f"{info.source}: {plan.method} mismatch: {origin} {plan.expected}, "
                f"the downloaded bytes give {actual}{layout}",
                result=result,
            )
        return result


def _same(plan: _Plan, actual: str) -> bool:
    """Compare values, ignoring hex case and base64 padding."""
    expected = plan.expected.strip()
    if plan.algorithm == "MD5":
        return expected.lower() == actual.lower()
    e_value, _, e_parts = expected.partition("-")
    a_value, _, a_parts = actual.partition("-")
    return e_parts == a_parts and e_value.rstrip("=") == a_value.rstrip("=")
