"""Queue message parsing: S3 event notifications, SNS and EventBridge wrappers, plain URIs."""

from __future__ import annotations

import json

import pytest

from fastpipe._events import Malformed, ObjectEvent, Skipped, parse_message, s3_event

# An S3 event notification as S3 writes it (trimmed of the fields fastpipe ignores):
# the key is URL-encoded, spaces as '+', a literal '+' as %2B, UTF-8 percent-encoded.
S3_PUT = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "eu-west-1",
            "eventTime": "2026-11-27T12:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "10.0.0.1"},
            "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810"},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "incoming",
                "bucket": {
                    "name": "media-incoming",
                    "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                    "arn": "arn:aws:s3:::media-incoming",
                },
                "object": {
                    "key": "videos/My+Holiday+%2B+caf%C3%A9%2F2026.mp4",
                    "size": 1048576,
                    "eTag": "d41d8cd98f00b204e9800998ecf8427e-2",
                    "versionId": "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY",
                    "sequencer": "0055AED6DCD90281E5",
                },
            },
        }
    ]
}


def test_s3_put_event_decodes_the_key_and_keeps_the_pins() -> None:
    [item] = parse_message(json.dumps(S3_PUT))
    assert item == ObjectEvent(
        bucket="media-incoming",
        key="videos/My Holiday + café/2026.mp4",
        size=1048576,
        etag="d41d8cd98f00b204e9800998ecf8427e-2",
        version_id="3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY",
        sequencer="0055AED6DCD90281E5",
        event_name="ObjectCreated:Put",
    )
    # The version pins the object: the engine reads that version, not the latest.
    assert item.source == (
        "s3://media-incoming/videos/My Holiday + café/2026.mp4"
        "?versionId=3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"
    )


def test_several_records_and_removals_in_one_message() -> None:
    created = json.loads(json.dumps(S3_PUT["Records"][0]))
    created["eventName"] = "ObjectCreated:CompleteMultipartUpload"
    created["s3"]["object"] = {"key": "a%20b.bin", "size": 0, "eTag": '"abc"'}
    removed = json.loads(json.dumps(S3_PUT["Records"][0]))
    removed["eventName"] = "ObjectRemoved:Delete"
    items = parse_message(json.dumps({"Records": [created, removed]}))
    assert items == [
        ObjectEvent("media-incoming", "a b.bin", size=0, etag="abc",
                    event_name="ObjectCreated:CompleteMultipartUpload"),
        Skipped("ObjectRemoved:Delete"),
    ]


def test_test_event_is_skipped() -> None:
    body = {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2026-11-27T12:00:00.000Z",
        "Bucket": "media-incoming",
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    }
    assert parse_message(json.dumps(body)) == [Skipped("s3:TestEvent")]


def test_sns_wrapped_s3_event() -> None:
    body = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:eu-west-1:123456789012:uploads",
        "Subject": "Amazon S3 Notification",
        "Message": json.dumps(S3_PUT),
        "Timestamp": "2026-11-27T12:00:00.000Z",
        "SignatureVersion": "1",
    }
    [item] = parse_message(json.dumps(body))
    assert isinstance(item, ObjectEvent)
    assert item.key == "videos/My Holiday + café/2026.mp4"


def test_eventbridge_object_created_keeps_the_key_as_is() -> None:
    body = {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "123456789012",
        "time": "2026-11-27T12:00:00Z",
        "region": "eu-west-1",
        "resources": ["arn:aws:s3:::media-incoming"],
        "detail": {
            "version": "0",
            "bucket": {"name": "media-incoming"},
            # EventBridge does not URL-encode keys: '+' stays a plus.
            "object": {
                "key": "raw/a+b c.bin",
                "size": 5,
                "etag": "b1946ac92492d2347c6235b4d2611184",
                "version-id": "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e",
                "sequencer": "617f08",
            },
            "request-id": "N4N7GDK58NMKJ12R",
            "reason": "PutObject",
        },
    }
    [item] = parse_message(json.dumps(body))
    assert item == ObjectEvent("media-incoming", "raw/a+b c.bin", size=5,
                               etag="b1946ac92492d2347c6235b4d2611184",
                               version_id="IYV3p45BT0ac8hjHg1houSdS1a.Mro8e",
                               sequencer="617f08", event_name="Object Created")
    body["detail-type"] = "Object Deleted"
    assert parse_message(json.dumps(body)) == [Skipped("EventBridge Object Deleted")]


def test_plain_uri_body() -> None:
    assert parse_message("  s3://b-1/some key?versionId=v1\n") == [
        ObjectEvent("b-1", "some key", version_id="v1")
    ]


@pytest.mark.parametrize(
    "body",
    [
        "",
        "not json",
        "[1, 2]",
        "null",
        '{"Records": []}',
        '{"Records": "x"}',
        '{"Records": [42]}',
        '{"Records": [{"eventName": "ObjectCreated:Put"}]}',
        '{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {}, "object": {}}}]}',
        '{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, '
        '"object": {"key": "k", "size": -1}}}]}',
        '{"Type": "Notification", "Message": "{oops"}',
        '{"hello": "world"}',
        "s3://",
        "s3://bucket-only",
        '{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "bkt"}, '
        '"object": {"key": "%"}}}]}',
        "\x00\xff",
        '{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "ab"}, '
        '"object": {"key": "k"}}}]}',
        '{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "abc"}, '
        '"object": {"key": "k%00.bin"}}}]}',
        '{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "abc"}, '
        '"object": {"key": "k%3FversionId%3D1"}}}]}',
        "{" * 100_000,
    ],
)
def test_malformed_bodies_are_results_not_exceptions(body: str) -> None:
    items = parse_message(body)
    assert items, body
    if body.endswith('"object": {"key": "%"}}}]}'):
        # A stray '%' is not an escape: unquote keeps it, as S3 would never send it encoded so.
        assert items == [ObjectEvent("bkt", "%", event_name="ObjectCreated:Put")]
        return
    assert all(isinstance(item, Malformed) for item in items), items
    assert all("\n" not in item.error for item in items if isinstance(item, Malformed))


def test_s3_event_round_trips_through_the_parser() -> None:
    keys = ["plain.bin", "with space.bin", "a+b.bin", "ünïcødé/ключ.bin", "100%.bin", "q?x=1",
            "a/../b.bin", " lead and trail ", "tab\tand\nnewline"]
    for key in keys:
        body = json.dumps(s3_event("bkt", key, size=3, etag='"e1"', version_id="v9"))
        assert parse_message(body) == [
            ObjectEvent("bkt", key, size=3, etag="e1", version_id="v9",
                        event_name="ObjectCreated:Put")
        ]
