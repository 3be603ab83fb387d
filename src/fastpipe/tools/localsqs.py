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
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

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
class LocalSQS:
    """moto's server on a free loopback port; ``endpoint_url`` is set once started."""

    startup_timeout: float = 60.0
    endpoint_url: str = ""
    region: str = "us-east-1"
    _proc: subprocess.Popen[bytes] | None = None
    _tmp: str = ""

    def start(self) -> LocalSQS:
        """Start the server and wait until it answers."""
        command = find_moto_server()
        (port,) = free_ports(1)
        self._tmp = tempfile.mkdtemp(prefix="fastpipe-sqs-")
        log = open(os.path.join(self._tmp, "moto.log"), "wb")  # noqa: SIM115 - child keeps it
        env = dict(os.environ)
        # Queue URLs name the address the server is reached at, never a public name.
        env["MOTO_HOST"] = "127.0.0.1"
        env["MOTO_PORT"] = str(port)
        try:
            self._proc = subprocess.Popen(
                [*command, "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        finally:
            log.close()
        self.endpoint_url = f"http://127.0.0.1:{port}"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise LocalSQSError(f"moto_server exited early:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means the server is up
            except OSError:
                time.sleep(0.2)
        raise LocalSQSError(f"moto_server did not answer within {self.startup_timeout}s")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server printed."""
        try:
            with open(os.path.join(self._tmp, "moto.log"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a short wait)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""

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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
