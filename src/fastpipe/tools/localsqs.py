"""A local SQS endpoint for tests and the demo: moto's standalone server on loopback.

The server runs as its own process (``moto_server -H 127.0.0.1 -p PORT``), bound to
127.0.0.1 on a free port, and is spoken to only over HTTP through an SQS client, exactly
as Amazon SQS would be: no patching of botocore anywhere. moto implements what the worker
relies on (visibility timeouts, ChangeMessageVisibility, long polling,
ApproximateReceiveCount, redrive to a dead-letter queue after ``maxReceiveCount``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ._procs import ServerProcess, start_server
from .locals3 import free_ports


class LocalSQSError(RuntimeError):
    """The local SQS server could not be started."""


def find_moto_server() -> list[str]:
    """The command that starts moto's server (beside this interpreter first)."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    raise LocalSQSError("moto's server was not found; install it with: pip install 'moto[server]'")


@dataclass
class LocalSQS(ServerProcess):
    """moto's server on a free loopback port; ``endpoint_url`` is set once started."""

    startup_timeout: float = 60.0
    endpoint_url: str = ""
    region: str = "us-east-1"
    _proc: subprocess.Popen[bytes] | None = None
    _tmp: str = ""
    _log_name: ClassVar[str] = "moto.log"

    def start(self) -> LocalSQS:
        """Start the server and wait until it answers."""
        command = find_moto_server()
        (port,) = free_ports(1)
        self._tmp = tempfile.mkdtemp(prefix="fastpipe-sqs-")
        env = dict(os.environ)
        # Queue URLs name the address the server is reached at, never a public name.
        env["MOTO_HOST"] = "127.0.0.1"
        env["MOTO_PORT"] = str(port)
        self.endpoint_url = f"http://127.0.0.1:{port}"
        try:
            self._proc = start_server(
                [*command, "-H", "127.0.0.1", "-p", str(port)],
                self.log_path,
                url=self.endpoint_url + "/moto-api/",
                timeout=self.startup_timeout,
                name="moto_server",
                error=LocalSQSError,
                env=env,
            )
        except BaseException:
            self.stop()  # removes the temporary folder
            raise
        return self

    def client(self) -> Any:
        """A plain boto3 SQS client for this server (tests and the demo set queues up)."""
        import boto3

        return boto3.client(
            "sqs",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        )

    def create_queue(
        self,
        name: str,
        *,
        visibility_timeout: int = 30,
        dlq_max_receives: int | None = None,
    ) -> tuple[str, str | None]:
        """Create a queue (and, with ``dlq_max_receives``, its dead-letter queue
        ``name-dlq`` and the redrive policy); return both URLs."""
        sqs = self.client()
        attributes = {"VisibilityTimeout": str(visibility_timeout)}
        dlq_url = None
        if dlq_max_receives is not None:
            dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
                "Attributes"
            ]["QueueArn"]
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(dlq_max_receives)}
            )
        url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        return str(url), dlq_url

    def __enter__(self) -> LocalSQS:
        return self.start()
