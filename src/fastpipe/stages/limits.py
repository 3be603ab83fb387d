"""The ``limits`` stream stage: size bounds, magic bytes and declared content type.

Size and content type are checked from HEAD, before any byte is fetched; the magic
prefix is checked on the first bytes, so a wrong file is rejected after one part.
"""

from __future__ import annotations

from typing import Any

from .._exceptions import StageFailed, UsageError
from ._base import ObjectInfo, StreamStage
from ._registry import Option, register, to_size


def parse_magic(text: str | bytes) -> bytes:
    """Parse a magic prefix written in hex (``89504e47``, ``0x1f8b``, ``50 4B 03 04``)."""
    if isinstance(text, bytes):
        return text
    cleaned = "".join(text.split()).replace(":", "")
    if cleaned[:2].lower() == "0x":
        cleaned = cleaned[2:]
    try:
        magic = bytes.fromhex(cleaned)
    except ValueError:
        raise UsageError(f"magic is not hex: {text!r} (example: magic=89504e47)") from None
    if not magic:
        raise UsageError("magic is empty")
    return magic


def _media_type(value: str) -> str:
    """``Text/Plain; charset=utf-8`` -> ``text/plain``."""
    return value.split(";", 1)[0].strip().lower()


def content_type_matches(declared: str, pattern: str) -> bool:
    """Whether a declared content type matches one pattern.

    Parameters (``; charset=...``) are ignored on both sides and case does not matter; a
    trailing ``*`` matches any rest (``video/*``, ``application/vnd.*``, ``*``).
    """
    media, wanted = _media_type(declared), _media_type(pattern)
    if wanted.endswith("*"):
        return media.startswith(wanted[:-1])
    return media == wanted


@register(
    "limits",
    {
        "min_size": Option(to_size, "smallest accepted object size (e.g. 1KiB)"),
        "max_size": Option(to_size, "largest accepted object size (e.g. 10GiB)"),
        "magic": Option(parse_magic, "hex prefix the first bytes must start with (e.g. 1f8b)"),
        "content_type": Option(
            str, "accepted declared content type; trailing * wildcard, | between choices"
        ),
    },
    "size bounds and declared content type (from HEAD), magic bytes (first bytes)",
)
class Limits(StreamStage):
    """Reject an object by its size, its declared content type or its first bytes.

    ``min_size``/``max_size`` bound ``info.size`` and ``content_type`` is compared with
    the declared one (``video/*`` style wildcards, alternatives separated by ``|``,
    parameters such as ``; charset=`` ignored); both are checked in :meth:`check_info`,
    before any byte is fetched. ``magic`` (bytes, or hex text) must be a prefix of the
    object; it is checked as soon as enough bytes arrived, however the first bytes are
    split between ``update`` calls.

    Result fields:

    - ``size``: the object size (from HEAD or stat);
    - ``content_type``: the declared content type, or None;
    - ``content_type_ok``: whether it matched (only with ``content_type``);
    - ``magic``: the object's first bytes, in hex, as many as the prefix (only with
      ``magic``; shorter when the object is shorter);
    - ``magic_ok``: whether they equal the prefix (only with ``magic``).
    """

    name = "limits"

    def __init__(
        self,
        min_size: int | str | None = None,
        max_size: int | str | None = None,
        magic: bytes | str | None = None,
        content_type: str | None = None,
    ) -> None:
        self.min_size = to_size(min_size) if isinstance(min_size, str) else min_size
        self.max_size = to_size(max_size) if isinstance(max_size, str) else max_size
        for label, value in (("min_size", self.min_size), ("max_size", self.max_size)):
            if value is not None and value < 0:
                raise UsageError(f"limits {label} must not be negative: {value}")
        if (
            self.min_size is not None
            and self.max_size is not None
            and self.min_size > self.max_size
        ):
            raise UsageError(
                f"limits min_size ({self.min_size}) is larger than max_size ({self.max_size})"
            )
        self.magic = parse_magic(magic) if magic is not None else None
        self.content_types: list[str] | None = None
        if content_type is not None:
            self.content_types = [p.strip() for p in content_type.split("|") if p.strip()]
            if not self.content_types:
                raise UsageError("limits content_type is empty")
        self._info: ObjectInfo | None = None
        self._head = bytearray()
        self._seen = 0

    def _base_result(self, info: ObjectInfo) -> dict[str, Any]:
        result: dict[str, Any] = {"size": info.size, "content_type": info.content_type}
        if self.content_types is not None:
            result["content_type_ok"] = info.content_type is not None and any(
                content_type_matches(info.content_type, p) for p in self.content_types
            )
        return result

    def check_info(self, info: ObjectInfo) -> None:
        """Check size and declared content type from metadata alone."""
        result = self._base_result(info)
        if self.min_size is not None and info.size < self.min_size:
            raise StageFailed(
                f"{info.source}: size {info.size} bytes is below min_size {self.min_size}",
                result=result,
            )
        if self.max_size is not None and info.size > self.max_size:
            raise StageFailed(
                f"{info.source}: size {info.size} bytes is above max_size {self.max_size}",
                result=result,
            )
        if self.content_types is not None and not result["content_type_ok"]:
            wanted = " | ".join(self.content_types)
            if info.content_type is None:
                cause = f"has no declared content type (expected {wanted})"
            else:
                cause = f"content type {info.content_type!r} does not match {wanted}"
            raise StageFailed(f"{info.source}: {cause}", result=result)
        if self.magic is not None and info.size < len(self.magic):
            raise StageFailed(
                f"{info.source}: size {info.size} bytes is shorter than the "
                f"{len(self.magic)}-byte magic prefix {self.magic.hex()}",
                result={**result, "magic": "", "magic_ok": False},
            )

    def start(self, info: ObjectInfo) -> None:
        self._info = info
        self._head = bytearray()
        self._seen = 0

    def update(self, view: memoryview) -> None:
        self._seen += len(view)
        if self.magic is None or len(self._head) >= len(self.magic):
            return
        self._head += view[: len(self.magic) - len(self._head)]
        if not self.magic.startswith(self._head):
            self._fail_magic()

    def _result(self) -> dict[str, Any]:
        info = self._info if self._info is not None else ObjectInfo("", self._seen)
        result = self._base_result(info)
        if self.magic is not None:
            result["magic"] = bytes(self._head).hex()
            result["magic_ok"] = bytes(self._head) == self.magic
        return result

    def _fail_magic(self) -> None:
        source = self._info.source if self._info is not None else "object"
        assert self.magic is not None
        if len(self._head) < len(self.magic) and self.magic.startswith(self._head):
            cause = (
                f"is {self._seen} bytes long, shorter than the "
                f"{len(self.magic)}-byte magic prefix {self.magic.hex()}"
            )
        else:
            cause = (
                f"starts with {bytes(self._head).hex()}, not the magic prefix {self.magic.hex()}"
            )
        raise StageFailed(f"{source}: {cause}", result=self._result())

    def finish(self) -> dict[str, Any]:
        if self.magic is not None and bytes(self._head) != self.magic:
            self._fail_magic()
        return self._result()
