"""TLS: the raw data plane speaks HTTPS through the loop's SSL transport, and
certificate verification stays on unless the user turns it off."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from faultproxy import FaultProxy

import fastpipe
from fastpipe import Config
from fastpipe.stages import Checksum
from fastpipe.tools.locals3 import LocalS3

trustme = pytest.importorskip("trustme")

PART = 256 << 10
_CA_KEYS: dict[str, bytes] = {}  # the private CA's key, by the path of its certificate


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalS3, str]]:
    """A second SeaweedFS serving S3 over HTTPS with a certificate from a private CA."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    _CA_KEYS[str(folder / "ca.pem")] = ca.private_key_pem.bytes()
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
    assert report.download.plane == plane
    assert dest.read_bytes() == data
    assert report.stage("checksum").result["hexdigest"] == hashlib.sha256(data).hexdigest()


def test_verification_off_only_when_asked(tls_env: str, tls_object: Any) -> None:
    uri, data = tls_object
    report = fastpipe.run(
        uri, stages=[Checksum("sha256")], config=Config(endpoint_url=tls_env, verify_tls=False)
    )
    assert report.passed
    assert report.stage("checksum").result["hexdigest"] == hashlib.sha256(data).hexdigest()


# -- the raw data plane verifies certificates on its own ----------------------------------


def _server_context(cert: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@pytest.fixture
def split_trust_proxy(
    tls_server: tuple[LocalS3, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FaultProxy, list[ssl.SSLContext]]]:
    """A TLS front for the server whose first connection (the control plane's HEAD) shows
    a certificate the client trusts, and every later one (the raw data plane's GETs) one
    from a CA nobody trusts; ``contexts`` lets a test change that."""
    server, ca_path = tls_server
    trusted = trustme.CA.from_pem(Path(ca_path).read_bytes(), _CA_KEYS[ca_path])
    stranger = trustme.CA()
    good = _server_context(trusted.issue_cert("127.0.0.1"))
    bad = _server_context(stranger.issue_cert("127.0.0.1"))
    contexts = [good, bad]
    upstream = urlsplit(server.endpoint_url)
    proxy = FaultProxy(
        upstream.hostname or "127.0.0.1",
        upstream.port or 80,
        tls=lambda k: contexts[min(k, 1)],
    )
    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CA_BUNDLE", ca_path)
    with proxy:
        yield proxy, contexts


def test_raw_plane_refuses_an_untrusted_certificate(
    split_trust_proxy: tuple[FaultProxy, list[ssl.SSLContext]], tls_object: Any, tmp_path: Path
) -> None:
    """HEAD passes over a trusted certificate; the GETs meet an untrusted one and the run
    fails, at once (a certificate is not a transient fault). With verification off on the
    raw plane this download would pass."""
    proxy, _ = split_trust_proxy
    uri, _ = tls_object
    with pytest.raises(fastpipe.SourceError) as info:
        fastpipe.run(
            uri,
            dest=tmp_path,
            config=Config(endpoint_url=proxy.url, part_size=PART, data_plane="raw"),
        )
    assert not isinstance(info.value, fastpipe.RetriesExhausted)
    assert "certificate" in str(info.value).lower()
    assert uri in str(info.value)
    assert len(proxy.heads()) == 1 and proxy.gets() == []  # no GET got through
    assert os.listdir(tmp_path) == []


def test_raw_plane_through_the_split_proxy_when_all_trusted(
    split_trust_proxy: tuple[FaultProxy, list[ssl.SSLContext]], tls_object: Any
) -> None:
    """The same setup with a trusted certificate on every connection passes: the refusal
    above is the certificate's doing, not the proxy's."""
    proxy, contexts = split_trust_proxy
    contexts[1] = contexts[0]
    uri, data = tls_object
    report = fastpipe.run(
        uri,
        stages=[Checksum("sha256")],
        config=Config(endpoint_url=proxy.url, part_size=PART, data_plane="raw"),
    )
    assert report.passed, report.error
    assert report.download.plane == "raw"
    assert report.stage("checksum").result["hexdigest"] == hashlib.sha256(data).hexdigest()
    assert len(proxy.gets()) == 6


def test_raw_plane_loads_the_ca_store_once_per_engine(
    tls_env: str, tls_object: Any, tls_server: Any, monkeypatch: Any
) -> None:
    """Two objects through one engine over HTTPS: the raw plane's TLS context (a load of
    the CA store, about 16 ms) is built once, not once per object."""
    uri, data = tls_object
    monkeypatch.setenv("AWS_CA_BUNDLE", tls_server[1])
    built: list[object] = []
    create = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(kwargs.get("cafile"))
        return create(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    reports = fastpipe.run_many(
        [uri, uri],
        ["checksum:algo=sha256"],
        config=Config(endpoint_url=tls_env, part_size=PART, data_plane="raw"),
    )
    assert [r.passed for r in reports] == [True, True]
    assert [r.download.plane for r in reports] == ["raw", "raw"]
    digest = hashlib.sha256(data).hexdigest()
    assert [r.stage("checksum").result["hexdigest"] for r in reports] == [digest, digest]
    assert built == [tls_server[1]]
