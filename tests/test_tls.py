"""TLS: the raw data plane speaks HTTPS through the loop's SSL transport, and
certificate verification stays on unless the user turns it off."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fastpipe
from fastpipe import Config
from fastpipe.stages import Checksum
from fastpipe.tools.locals3 import LocalS3

trustme = pytest.importorskip("trustme")

PART = 256 << 10


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalS3, str]]:
    """A second SeaweedFS serving S3 over HTTPS with a certificate from a private CA."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server = LocalS3(tls_cert=str(folder / "cert.pem"), tls_key=str(folder / "key.pem"))
    with server:
        yield server, str(folder / "ca.pem")


@pytest.fixture(scope="module")
def tls_object(tls_server: tuple[LocalS3, str]) -> tuple[str, bytes]:
    import boto3

    server, _ = tls_server
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,  # upload over plain HTTP
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="tls-bucket")
    data = os.urandom(5 * PART + 3)
    client.put_object(Bucket="tls-bucket", Key="obj.bin", Body=data)
    return "s3://tls-bucket/obj.bin", data


@pytest.fixture
def tls_env(tls_server: tuple[LocalS3, str], monkeypatch: pytest.MonkeyPatch) -> str:
    server, _ = tls_server
    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    return server.https_endpoint_url


def test_untrusted_certificate_is_refused(tls_env: str, tls_object: Any) -> None:
    uri, _ = tls_object
    with pytest.raises(fastpipe.SourceError) as info:
        fastpipe.run(uri, config=Config(endpoint_url=tls_env))
    assert "certificate" in str(info.value).lower() or "ssl" in str(info.value).lower()


@pytest.mark.parametrize("plane", ["raw", "botocore"])
def test_trusted_with_ca_bundle(
    tls_env: str, tls_object: Any, tls_server: Any, plane: str, tmp_path: Path, monkeypatch: Any
) -> None:
    uri, data = tls_object
    monkeypatch.setenv("AWS_CA_BUNDLE", tls_server[1])
    dest = tmp_path / "o.bin"
    report = fastpipe.run(
        uri,
        stages=[Checksum("sha256")],
        dest=dest,
        config=Config(endpoint_url=tls_env, part_size=PART, data_plane=plane),
    )
    assert report.passed, report.error
    assert report.download.path == plane
    assert dest.read_bytes() == data
    assert report.stage("checksum").result["hexdigest"] == hashlib.sha256(data).hexdigest()


def test_verification_off_only_when_asked(tls_env: str, tls_object: Any) -> None:
    uri, data = tls_object
    report = fastpipe.run(
        uri, stages=[Checksum("sha256")], config=Config(endpoint_url=tls_env, verify_tls=False)
    )
    assert report.passed
    assert report.stage("checksum").result["hexdigest"] == hashlib.sha256(data).hexdigest()
