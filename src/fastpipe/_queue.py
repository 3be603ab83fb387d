"""The SQS side of the worker: receive (long polling), delete, change visibility, send.

One aiobotocore session and SQS client, created the way :mod:`fastpipe._s3` creates its S3
client. The endpoint is ``sqs_endpoint_url``, else ``AWS_ENDPOINT_URL_SQS``, else the
scheme and host of a queue URL that is not Amazon's (a local or compatible server), else
botocore's default for the region. Errors become :class:`fastpipe.SourceError` family
errors with one-line messages naming the queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio

from ._exceptions import AccessDenied, EndpointUnreachable, SourceError, UsageError

logger = logging.getLogger(__name__)

#: SQS caps: 10 messages a receive, 20 s of long polling, 12 h of visibility.
MAX_RECEIVE = 10
MAX_WAIT_SECONDS = 20
MAX_VISIBILITY = 12 * 3600


@dataclass
class Message:
    """One received message: its body, receipt handle and receive count."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int = 1
    #: When SQS accepted the message (epoch seconds), for end-to-end latency.
    sent_at: float | None = None


def sqs_endpoint(queue_url: str, explicit: str | None = None) -> str | None:
    """The endpoint to send SQS calls to (see the module docstring)."""
    if explicit:
        return explicit
    env = os.environ.get("AWS_ENDPOINT_URL_SQS")
    if env:
        return env
    parts = urlsplit(queue_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"malformed queue URL {queue_url!r}: expected https://host/account/name")
    if parts.hostname.endswith(".amazonaws.com"):
        return None
    return f"{parts.scheme}://{parts.netloc}"


class Queue:
    """An SQS queue reached through one aiobotocore client (``async with Queue(...)``)."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        self.url = url
        self.endpoint_url = sqs_endpoint(url, endpoint_url)
        self.region = region
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._client_lock = anyio.Lock()

    async def __aenter__(self) -> Queue:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client and its connections."""
        await self._stack.aclose()
        self._client = None

    async def client(self) -> Any:
        """The SQS client (created on first call)."""
        async with self._client_lock:  # concurrent first calls (results sink) share one
            if self._client is None:
                # Importing aiobotocore and reading the AWS config files block: in a thread,
                # as a results queue's client is made while other objects are transferring.
                session, region, config = await anyio.to_thread.run_sync(self._client_setup)
                try:
                    self._client = await self._stack.enter_async_context(
                        session.create_client(
                            "sqs", endpoint_url=self.endpoint_url, region_name=region, config=config
                        )
                    )
                except ValueError as exc:
                    raise UsageError(f"SQS client setup: {exc}") from None
        return self._client

    def _client_setup(self) -> tuple[Any, str, Any]:
        """The aiobotocore session, region and client config."""
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        session = get_session()
        region = self.region or session.get_config_variable("region") or "us-east-1"
        # The read timeout must outlast a 20 s long poll.
        config = AioConfig(
            connect_timeout=10,
            read_timeout=MAX_WAIT_SECONDS + 15,
            retries={"max_attempts": 5, "mode": "standard"},
        )
        return session, str(region), config

    async def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        try:
            return await fn(**kwargs)
        except (EndpointConnectionError, ConnectTimeoutError) as exc:
            raise EndpointUnreachable(f"{self.url}: {what}: endpoint unreachable: {exc}") from exc
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            message = f"{self.url}: {what}: {code}: {err.get('Message', '')}"
            if "AccessDenied" in code or "InvalidClientTokenId" in code:
                raise AccessDenied(message) from None
            raise SourceError(message) from None
        except NoCredentialsError as exc:
            raise AccessDenied(f"{self.url}: {what}: no AWS credentials found") from exc
        except BotoCoreError as exc:
            raise SourceError(f"{self.url}: {what}: {exc}") from exc

    async def visibility_timeout(self) -> int:
        """The queue's default visibility timeout in seconds."""
        client = await self.client()
        answer = await self._call(
            "GetQueueAttributes",
            client.get_queue_attributes,
            QueueUrl=self.url,
            AttributeNames=["VisibilityTimeout"],
        )
        return int(answer.get("Attributes", {}).get("VisibilityTimeout", 30))

    async def receive(self, max_messages: int, wait_seconds: int) -> list[Message]:
        """Up to ``max_messages`` messages, long polling up to ``wait_seconds``."""
        client = await self.client()
        answer = await self._call(
            "ReceiveMessage",
            client.receive_message,
            QueueUrl=self.url,
            MaxNumberOfMessages=max(1, min(MAX_RECEIVE, max_messages)),
            WaitTimeSeconds=max(0, min(MAX_WAIT_SECONDS, wait_seconds)),
            AttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        messages = []
        for raw in answer.get("Messages", []):
            attrs = raw.get("Attributes", {})
            sent = attrs.get("SentTimestamp")
            messages.append(
                Message(
                    message_id=str(raw.get("MessageId", "")),
                    receipt_handle=str(raw["ReceiptHandle"]),
                    body=str(raw.get("Body", "")),
                    receive_count=int(attrs.get("ApproximateReceiveCount", 1)),
                    sent_at=int(sent) / 1000 if sent else None,
                )
            )
        return messages

    async def delete(self, message: Message) -> None:
        """Delete (acknowledge) ``message``."""
        client = await self.client()
        await self._call(
            "DeleteMessage",
            client.delete_message,
            QueueUrl=self.url,
            ReceiptHandle=message.receipt_handle,
        )

    async def change_visibility(self, message: Message, seconds: int) -> None:
        """Make ``message`` invisible for ``seconds`` from now (0: visible at once)."""
        client = await self.client()
        await self._call(
            "ChangeMessageVisibility",
            client.change_message_visibility,
            QueueUrl=self.url,
            ReceiptHandle=message.receipt_handle,
            VisibilityTimeout=max(0, min(MAX_VISIBILITY, int(seconds))),
        )

    async def send(self, body: str) -> None:
        """Send one message."""
        client = await self.client()
        await self._call("SendMessage", client.send_message, QueueUrl=self.url, MessageBody=body)

    async def send_batch(self, bodies: list[str]) -> None:
        """Send up to 10 messages in one call; a message SQS refused raises."""
        client = await self.client()
        entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies)]
        answer = await self._call(
            "SendMessageBatch", client.send_message_batch, QueueUrl=self.url, Entries=entries
        )
        failed = answer.get("Failed") or []
        if failed:
            first = failed[0]
            raise SourceError(
                f"{self.url}: SendMessageBatch: {len(failed)} of {len(bodies)} refused: "
                f"{first.get('Code')}: {first.get('Message')}"
            )
