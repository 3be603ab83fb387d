"""What a queue message asks for: S3 event notifications and their wrappers, parsed.

One module owns the formats S3 and its neighbours put on a queue:

- S3 event notifications (``{"Records": [{"eventSource": "aws:s3", "eventName":
  "ObjectCreated:Put", "s3": {"bucket": {"name": ...}, "object": {"key": ..., "size": ...,
  "eTag": ..., "versionId": ..., "sequencer": ...}}}]}``); the key is URL-encoded with
  ``+`` for spaces;
- the same wrapped by SNS (``{"Type": "Notification", "Message": "<the JSON as a string>"}``);
- EventBridge ``Object Created`` events (``{"source": "aws.s3", "detail-type": "Object
  Created", "detail": {"bucket": {"name": ...}, "object": {"key": ...}}}``; the key is
  not URL-encoded there);
- a plain ``s3://bucket/key`` body (optionally ``?versionId=``).

``s3:TestEvent`` and ``ObjectRemoved:*`` (and EventBridge ``Object Deleted``) are
recognised and skipped. Parsing never raises: a body that cannot be understood is a
:class:`Malformed` result, which the worker logs and leaves for the queue's redrive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from ._exceptions import UsageError
from ._source import S3Location, parse_source


@dataclass(frozen=True)
class ObjectEvent:
    """One object to process, as an event announced it."""

    bucket: str
    key: str
    size: int | None = None
    #: The ETag the event saw, without quotes (None when the message did not say).
    etag: str | None = None
    version_id: str | None = None
    sequencer: str | None = None
    event_name: str = "ObjectCreated"

    @property
    def source(self) -> str:
        """The URI to process: pinned to the event's version when it has one."""
        return str(S3Location(self.bucket, self.key, self.version_id))


@dataclass(frozen=True)
class Skipped:
    """A record that asks for nothing (a test event, a removal); ``reason`` says which."""

    reason: str


@dataclass(frozen=True)
class Malformed:
    """A body or record that could not be parsed; ``error`` says why (one line)."""

    error: str


Item = ObjectEvent | Skipped | Malformed


def parse_message(body: str) -> list[Item]:
    """The items a message body holds, in order (never raises; never empty)."""
    try:
        return _parse_body(body)
    except Exception as exc:  # a hostile body must never take the worker down
        return [Malformed(f"unparseable message: {type(exc).__name__}: {exc}")]


def _parse_body(body: str) -> list[Item]:
    text = body.strip()
    if text.lower().startswith("s3://"):
        try:
            location = parse_source(text)
        except UsageError as exc:
            return [Malformed(str(exc))]
        assert isinstance(location, S3Location)
        return [ObjectEvent(location.bucket, location.key, version_id=location.version_id)]
    try:
        data = json.loads(text)
    except ValueError as exc:
        return [Malformed(f"message is neither JSON nor an s3:// URI: {exc}")]
    return _parse_json(data, depth=0)


def _parse_json(data: Any, depth: int) -> list[Item]:
    if not isinstance(data, dict):
        return [Malformed(f"message JSON is a {type(data).__name__}, not an object")]
    if data.get("Event") == "s3:TestEvent":
        return [Skipped("s3:TestEvent")]
    if "Records" in data:
        records = data["Records"]
        if not isinstance(records, list) or not records:
            return [Malformed("Records is not a non-empty list")]
        return [_parse_record(record) for record in records]
    if data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        if depth >= 2:
            return [Malformed("SNS notification nested too deep")]
        inner = data["Message"]
        if inner.strip().lower().startswith("s3://"):
            return _parse_body(inner)
        try:
            return _parse_json(json.loads(inner), depth + 1)
        except ValueError as exc:
            return [Malformed(f"SNS Message is not JSON: {exc}")]
    if data.get("source") == "aws.s3" and "detail-type" in data:
        return [_parse_eventbridge(data)]
    return [Malformed("not an S3 event notification, SNS notification or EventBridge event")]


def _parse_record(record: Any) -> Item:
    if not isinstance(record, dict):
        return Malformed("a record is not an object")
    name = record.get("eventName")
    if not isinstance(name, str):
        return Malformed("record without eventName")
    if not name.startswith("ObjectCreated:"):  # ObjectRemoved:*, and any other kind
        return Skipped(name)
    s3 = record.get("s3")
    if not isinstance(s3, dict):
        return Malformed(f"{name} record without s3")
    bucket = _name(s3.get("bucket"), "name")
    obj = s3.get("object")
    raw_key = _name(obj, "key")
    if bucket is None or raw_key is None:
        return Malformed(f"{name} record without bucket name or object key")
    assert isinstance(obj, dict)
    return _object_event(bucket, unquote_plus(raw_key), obj, name)


def _parse_eventbridge(data: dict[str, Any]) -> Item:
    kind = data.get("detail-type")
    if kind != "Object Created":
        return Skipped(f"EventBridge {kind}")
    detail = data.get("detail")
    if not isinstance(detail, dict):
        return Malformed("EventBridge event without detail")
    bucket = _name(detail.get("bucket"), "name")
    obj = detail.get("object")
    key = _name(obj, "key")
    if bucket is None or key is None:
        return Malformed("EventBridge event without bucket name or object key")
    assert isinstance(obj, dict)
    # EventBridge keys are plain text: no URL decoding.
    return _object_event(bucket, key, obj, "Object Created")


def _object_event(bucket: str, key: str, obj: dict[str, Any], name: str) -> Item:
    if not bucket or not key:
        return Malformed(f"{name} with an empty bucket name or key")
    size = obj.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        return Malformed(f"{name} for s3://{bucket}/{key}: bad size {size!r}")
    etag = obj.get("eTag", obj.get("etag"))
    version = obj.get("versionId", obj.get("version-id"))
    sequencer = obj.get("sequencer")
    event = ObjectEvent(
        bucket,
        key,
        size=size,
        etag=etag.strip('"') or None if isinstance(etag, str) else None,
        version_id=version or None if isinstance(version, str) else None,
        sequencer=sequencer if isinstance(sequencer, str) else None,
        event_name=name,
    )
    try:
        # What the engine will be given must parse back to this object (a NUL in the key,
        # a bucket name of the wrong length, a key that looks like a version query).
        if parse_source(event.source) != S3Location(bucket, key, event.version_id):
            return Malformed(f"{name}: key {key!r} cannot be named by an s3:// URI")
    except UsageError as exc:
        return Malformed(f"{name}: {exc}")
    return event


def _name(container: Any, field: str) -> str | None:
    if not isinstance(container, dict):
        return None
    value = container.get(field)
    return value if isinstance(value, str) else None


def s3_event(
    bucket: str,
    key: str,
    *,
    size: int | None = None,
    etag: str | None = None,
    version_id: str | None = None,
    event_time: str = "1970-01-01T00:00:00.000Z",
) -> dict[str, Any]:
    """An S3 ``ObjectCreated:Put`` event notification for one object (what ``fastpipe
    enqueue`` sends), in the format S3 itself writes: the key URL-encoded, ``+`` for
    spaces."""
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/")}
    if size is not None:
        obj["size"] = size
    if etag:
        obj["eTag"] = etag.strip('"')
    if version_id:
        obj["versionId"] = version_id
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventTime": event_time,
                "eventName": "ObjectCreated:Put",
                "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": obj},
            }
        ]
    }
