"""The light control plane: the same URLs, signatures, answers and errors as botocore's.

Offline, presigned URLs and HEAD signatures are compared with botocore's at a frozen
clock; live, both planes HEAD the same SeaweedFS objects and must agree on every field
and every error; a fresh process shows that an eligible run never imports botocore.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from freshpy import run_fresh

import fastpipe
from fastpipe import Config
from fastpipe._light import LightControl
from fastpipe._lightsetup import LightSetup, light_setup, plain_bucket
from fastpipe._s3 import S3Control
from fastpipe._s3meta import TransientError
from fastpipe._sigv4 import encode_key_path, presign_get, sign_headers, uri_encode
from fastpipe._source import S3Location

FROZEN = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc)

KEYS = [
    "k",
    "a b",
    "plus+sign",
    "tilde~x",
    "dir/sub/file.bin",
    "100%",
    "%2F",
    "ü/ß/日本語",
    " ",
    "/lead",
    "a//b",
    "../x",
    "./x/..",
    "q?x=1&y=2",
    "hash#frag",
    "=;:@,$!'()*[]",
    "tab\tand\nnewline",
    "x" * 1000,
]
ENDPOINTS = [
    "http://127.0.0.1:8333",
    "http://localhost:9000",
    "https://minio.example.com",
    "https://minio.example.com:8443/",
    "http://[::1]:8333",
    "http://127.0.0.1",
]
BUCKETS = ["bkt", "b.dot", "B_ad", "a-b", "x" * 63]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """An environment of static keys and a region, nothing else from AWS."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    yield monkeypatch


def _setup(endpoint: str, region: str, token: str | None, env: pytest.MonkeyPatch) -> LightSetup:
    if token:
        env.setenv("AWS_SESSION_TOKEN", token)
    setup, why = light_setup(Config(endpoint_url=endpoint, region=region))
    assert setup is not None, why
    return setup


def _boto_client(setup: LightSetup, endpoint: str) -> Any:
    import botocore.session
    from botocore.config import Config as BotoConfig

    creds = setup.credentials
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=setup.region,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        aws_session_token=creds.token,
        config=BotoConfig(signature_version="s3v4"),
    )


@pytest.fixture
def frozen_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's signers (its own and awscrt's, whichever it picks) read FROZEN."""
    import botocore.auth

    monkeypatch.setattr(
        botocore.auth, "get_current_datetime", lambda **_: FROZEN.replace(tzinfo=None)
    )
    try:
        import botocore.crt.auth as crt_auth
    except ImportError:
        return
    monkeypatch.setattr(
        crt_auth,
        "get_current_datetime",
        lambda remove_tzinfo=True: FROZEN.replace(tzinfo=None) if remove_tzinfo else FROZEN,
    )


# -- (a) offline equivalence ------------------------------------------------------------


def _case_params() -> Iterator[Any]:
    for i, key in enumerate(KEYS):
        endpoint = ENDPOINTS[i % len(ENDPOINTS)]
        bucket = BUCKETS[i % len(BUCKETS)]
        region = ("us-east-1", "eu-west-3", "local")[i % 3]
        token = "FQoGZXIvYXdzE/+=token value" if i % 2 else None
        version = (
            "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo"
            if i % 4 == 1
            else None
        )
        yield pytest.param((endpoint, bucket, key, region, token, version), id=f"key{i}")


CASES = list(_case_params())


@dataclass(frozen=True)
class Case:
    """One offline case: where, what, and the light setup for it."""

    endpoint: str
    bucket: str
    key: str
    region: str
    version: str | None
    setup: LightSetup


@pytest.fixture(params=CASES)
def case(
    request: pytest.FixtureRequest, aws_env: pytest.MonkeyPatch, frozen_botocore: None
) -> Case:
    """A case of :data:`CASES` with its setup (token in the environment, clock frozen)."""
    endpoint, bucket, key, region, token, version = request.param
    setup = _setup(endpoint, region, token, aws_env)
    return Case(endpoint, bucket, key, region, version, setup)


def test_presigned_url_is_botocores(case: Case) -> None:
    """Byte for byte the URL botocore's client presigns, at the same instant."""
    setup, bucket, key, version = case.setup, case.bucket, case.key, case.version
    params = {"Bucket": bucket, "Key": key}
    if version:
        params["VersionId"] = version
    theirs = _boto_client(setup, case.endpoint).generate_presigned_url(
        "get_object", Params=params, ExpiresIn=900
    )
    ours = presign_get(
        setup.credentials,
        setup.region,
        setup.base,
        setup.host,
        encode_key_path(bucket, key),
        [("versionId", version)] if version else [],
        900,
        now=FROZEN,
    )
    assert ours == theirs


def test_presigned_url_signs_as_botocores_own_signer(case: Case) -> None:
    """The same parameters and signature as botocore's pure-Python S3 query signer (used
    when awscrt is absent; it orders two parameters differently)."""
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    setup, bucket, key, version = case.setup, case.bucket, case.key, case.version
    path = encode_key_path(bucket, key)
    params = [("versionId", version)] if version else []
    query = "&".join(f"{uri_encode(k)}={uri_encode(v)}" for k, v in params)
    request = AWSRequest("GET", f"{setup.base}{path}" + (f"?{query}" if query else ""))
    creds = setup.credentials
    boto_creds = Credentials(creds.access_key, creds.secret_key, creds.token)
    S3SigV4QueryAuth(boto_creds, "s3", case.region, expires=900).add_auth(request)
    ours = presign_get(creds, case.region, setup.base, setup.host, path, params, 900, now=FROZEN)
    theirs = urlsplit(request.url)
    assert urlsplit(ours)[:3] == theirs[:3]
    assert sorted(parse_qsl(urlsplit(ours).query)) == sorted(parse_qsl(theirs.query))


def test_head_signature_is_botocores(case: Case) -> None:
    """botocore's S3 SigV4 (its own and awscrt's) signs our HEAD's headers the same."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    setup, bucket, key, version = case.setup, case.bucket, case.key, case.version
    path = encode_key_path(bucket, key)
    params = [("partNumber", "1")] + ([("versionId", version)] if version else [])
    ours = sign_headers(
        setup.credentials,
        case.region,
        "HEAD",
        setup.host,
        path,
        params,
        {"x-amz-checksum-mode": "ENABLED"},
        now=FROZEN,
    )
    query = "&".join(f"{uri_encode(k)}={uri_encode(v)}" for k, v in params)
    creds = setup.credentials
    boto_creds = Credentials(creds.access_key, creds.secret_key, creds.token)
    signers: list[Any] = [S3SigV4Auth]
    try:
        from botocore.crt.auth import CrtS3SigV4Auth

        signers.append(CrtS3SigV4Auth)
    except ImportError:
        pass
    for signer in signers:
        unsigned = {k: v for k, v in ours.items() if k != "authorization"}
        request = AWSRequest("HEAD", f"{setup.base}{path}?{query}", headers=unsigned)
        signer(boto_creds, "s3", case.region).add_auth(request)
        assert request.headers["Authorization"] == ours["authorization"], signer.__name__


def test_credentials_never_show(aws_env: pytest.MonkeyPatch) -> None:
    setup = _setup("http://127.0.0.1:1", "us-east-1", "SECRET-TOKEN", aws_env)
    text = repr(setup)
    assert "wJalrXUtnFEMI" not in text and "SECRET-TOKEN" not in text


# -- (c) eligibility ------------------------------------------------------------------------


ELIGIBILITY = [
    ({}, {}, "", True),
    ({}, {"region": "eu-west-1"}, "", True),
    ({"AWS_SESSION_TOKEN": "t"}, {}, "", True),
    ({"AWS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"}, {}, "", True),
    ({"AWS_REGION": "eu-west-1"}, {}, "", True),
    ({}, {}, "[default]\nregion = eu-west-1\noutput = json\n", True),
    ({"AWS_DEFAULT_REGION": ""}, {}, "[default]\nregion = eu-west-1\n", True),
    ({"AWS_DEFAULT_REGION": ""}, {}, "", True),  # us-east-1, as the botocore client gets
    ({"AWS_DEFAULT_REGION": None}, {}, "[default]\nregion = eu-west-1\n", True),
    ({"AWS_DEFAULT_REGION": None}, {}, "", True),
    ({"AWS_PROFILE": "other"}, {}, "", False),
    ({"AWS_USE_FIPS_ENDPOINT": "true"}, {}, "", False),
    ({"AWS_USE_DUALSTACK_ENDPOINT": "true"}, {}, "", False),
    ({"AWS_S3_US_EAST_1_REGIONAL_ENDPOINT": "regional"}, {}, "", False),
    ({"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}, {}, "", False),
    ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:2"}, {}, "", False),
    ({"AWS_SECRET_ACCESS_KEY": ""}, {}, "", False),
    ({"AWS_CREDENTIAL_EXPIRATION": "2030-01-01T00:00:00Z"}, {}, "", False),
    ({}, {"control_plane": "botocore"}, "", False),
    ({}, {"data_plane": "botocore"}, "", False),
    ({"HTTP_PROXY": "http://127.0.0.1:3"}, {}, "", False),
    ({"HTTP_PROXY": "http://127.0.0.1:3", "NO_PROXY": "127.0.0.1"}, {}, "", True),
    ({}, {"endpoint_url": None}, "", False),  # AWS's own endpoints
    ({}, {"endpoint_url": "http://127.0.0.1:9000/prefix"}, "", False),
    ({}, {"endpoint_url": "http://LocalHost:9000"}, "", False),
    ({}, {"endpoint_url": "http://127.0.0.1:80"}, "", False),
    ({}, {"endpoint_url": "https://s3.eu-west-1.amazonaws.com"}, "", False),
    ({}, {}, "[default]\ns3 =\n  addressing_style = virtual\n", False),
    ({}, {}, "[default]\nca_bundle = /x.pem\n", False),
    ({}, {}, "[profile default]\nendpoint_url = http://127.0.0.1:2\n", False),
    ({}, {}, "not an ini file", False),
]


@pytest.mark.parametrize(("env", "options", "config_file", "light"), ELIGIBILITY)
def test_eligibility(
    aws_env: pytest.MonkeyPatch,
    tmp_path: Path,
    env: dict[str, str | None],
    options: dict[str, Any],
    config_file: str,
    light: bool,
) -> None:
    for name, value in env.items():
        if value is None:
            aws_env.delenv(name)
        else:
            aws_env.setenv(name, value)
    if config_file:
        (tmp_path / "config").write_text(config_file)
        aws_env.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    config = Config(**{"endpoint_url": "http://127.0.0.1:9000", **options})
    setup, why = light_setup(config)
    assert (setup is not None) == light, why
    control = S3Control(config)
    if setup is not None:  # it signs for the region the botocore client is created with
        import botocore.session

        options = control._client_options(botocore.session.get_session(), {})
        assert setup.region == options["region_name"]
    where = S3Location("bucket", "key")
    assert control.control_plane(where) == ("light" if light else "botocore")


@pytest.mark.parametrize(
    ("bucket", "plain"),
    [("bkt", True), ("B_ad.x", True), ("b--x-s3", False), ("arn:aws:s3:::x", False)],
)
def test_buckets_the_endpoint_rules_treat_apart_keep_botocore(bucket: str, plain: bool) -> None:
    assert plain_bucket(bucket) == plain


# -- (b) live, against SeaweedFS -------------------------------------------------------------


def _controls(endpoint: str, **options: Any) -> tuple[S3Control, S3Control]:
    light = S3Control(Config(endpoint_url=endpoint, **options))
    boto = S3Control(Config(endpoint_url=endpoint, control_plane="botocore", **options))
    return light, boto


async def _head_both(
    endpoint: str, location: S3Location, **options: Any
) -> tuple[Any, Any, S3Control]:
    """Each plane's ObjectInfo (or the error it raised) for ``location``."""
    light, boto = _controls(endpoint, **options)
    results: list[Any] = []
    for control in (light, boto):
        try:
            results.append(await control.head(location))
        except fastpipe.FastpipeError as exc:
            results.append((type(exc), str(exc)))
        finally:
            await control.close()
    return results[0], results[1], light


SPECIAL_KEYS = ["a b+c~d", "dir/ü ß/日本.bin", "100%/x", "q?x=1&y=2#h", "a//b", "=;:@,$!'()*"]


@pytest.mark.anyio
@pytest.mark.parametrize("key", SPECIAL_KEYS)
async def test_live_head_equals_botocores(s3_server: Any, put_object: Any, key: str) -> None:
    uri = put_object(b"hello " * 100, key=f"{uuid.uuid4().hex}/{key}", Metadata={"m": "v"})
    bucket, _, name = uri[5:].partition("/")
    location = S3Location(bucket, name)
    ours, theirs, light = await _head_both(s3_server.endpoint_url, location)
    assert light.control_plane(location) == "light"
    assert ours == theirs and ours.size == 600


@pytest.mark.anyio
async def test_live_head_checksums_and_multipart(
    s3_server: Any, s3_client: Any, bucket: str
) -> None:
    """The checksum headers, the multipart ETag and part 1's size (second HEAD) agree."""
    key = f"mp-{uuid.uuid4().hex}"
    upload = s3_client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")
    parts = []
    for number, size in ((1, 5 << 20), (2, 1000)):
        answer = s3_client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=os.urandom(size),
            ChecksumAlgorithm="CRC32",
        )
        parts.append(
            {
                "PartNumber": number,
                "ETag": answer["ETag"],
                "ChecksumCRC32": answer.get("ChecksumCRC32"),
            }
        )
    s3_client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    single = f"one-{uuid.uuid4().hex}"
    s3_client.put_object(Bucket=bucket, Key=single, Body=b"x" * 10, ChecksumAlgorithm="SHA256")
    for name in (key, single):
        ours, theirs, _ = await _head_both(s3_server.endpoint_url, S3Location(bucket, name))
        assert ours == theirs
    assert ours.checksums  # the SHA256 S3 stored came through the light HEAD


@pytest.mark.anyio
@pytest.mark.parametrize(
    "where",
    [
        S3Location("fastpipe-tests", "no-such-key"),
        S3Location("no-such-bucket-light", "k"),
    ],
    ids=["key", "bucket"],
)
async def test_live_missing_object_errors_equal(
    s3_server: Any, bucket: str, where: S3Location
) -> None:
    ours, theirs, _ = await _head_both(s3_server.endpoint_url, where)
    assert ours == theirs
    assert ours[0] is fastpipe.ObjectNotFound and str(where) in ours[1]


@pytest.mark.anyio
async def test_missing_key_then_the_buckets_answer_decides_alike(proxy: Any, bucket: str) -> None:
    """The object's HEAD says not found; the bucket's HEAD (through the fault proxy) then
    decides "no such bucket" or "no such key" the same way on both planes."""
    from faultproxy import Fault

    answers = {
        "missing": Fault("error", status=404, code="NoSuchBucket"),
        "denied": Fault("error", status=403, code="AccessDenied"),
        "failing": Fault("error", status=500, code="InternalError"),
        "there": None,
    }
    where = S3Location(bucket, f"no-such-key-{uuid.uuid4().hex}")
    got = {}
    for name, fault in answers.items():

        def plan(n: int, request: Any, fault: Any = fault) -> Any:
            path = request.target.split("?")[0].strip("/")
            return fault if "/" not in path else None  # the bucket's HEAD only

        proxy.reset(None, head_plan=plan)
        ours, theirs, _ = await _head_both(proxy.url, where, backoff_base=0.001)
        assert ours == theirs, name
        got[name] = ours
    assert got["missing"] == (fastpipe.ObjectNotFound, f"{where}: no such bucket {bucket!r}")
    assert got["there"] == (fastpipe.ObjectNotFound, f"{where}: no such key")
    # A bucket that refuses HeadBucket exists (S3 says 404 for one that does not): the
    # key is what is missing.
    assert got["denied"] == (fastpipe.ObjectNotFound, f"{where}: no such key")
    assert got["failing"][0] is TransientError


@pytest.mark.anyio
async def test_live_wrong_secret_is_access_denied(
    s3_server: Any, put_object: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = put_object(b"x")
    bucket, _, key = uri[5:].partition("/")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    ours, theirs, _ = await _head_both(s3_server.endpoint_url, S3Location(bucket, key))
    assert ours == theirs
    assert ours[0] is fastpipe.AccessDenied and uri in ours[1]
    assert "not-the-secret" not in ours[1]


@pytest.mark.anyio
async def test_live_other_region_agrees(s3_server: Any, put_object: Any) -> None:
    """SeaweedFS does not check the region it is signed for: both planes read the object."""
    uri = put_object(b"abc")
    bucket, _, key = uri[5:].partition("/")
    ours, theirs, _ = await _head_both(
        s3_server.endpoint_url, S3Location(bucket, key), region="eu-west-3"
    )
    assert ours == theirs and ours.size == 3


@pytest.mark.anyio
async def test_live_unreachable_endpoint(aws_env: pytest.MonkeyPatch) -> None:
    """Nothing listens: EndpointUnreachable on both planes, after their retries."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ours, theirs, _ = await _head_both(
        f"http://127.0.0.1:{port}", S3Location("b", "k"), backoff_base=0.001, connect_timeout=1
    )
    assert ours[0] is theirs[0] is fastpipe.EndpointUnreachable
    assert "s3://b/k" in ours[1]


def test_live_download_special_key(s3_server: Any, put_object: Any, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    uri = put_object(data, key=f"{uuid.uuid4().hex}/ü b+c~%d")
    config = Config(endpoint_url=s3_server.endpoint_url, part_size=1 << 20)
    report = fastpipe.run(uri, dest=tmp_path / "out", config=config)
    assert report.passed, report.error
    assert report.download.control_plane == "light"
    assert (tmp_path / "out").read_bytes() == data
    forced = fastpipe.run(
        uri, config=Config(endpoint_url=s3_server.endpoint_url, control_plane="botocore")
    )
    assert forced.download.control_plane == "botocore"


def test_presign_renews_before_expiry(aws_env: pytest.MonkeyPatch) -> None:
    setup = _setup("http://127.0.0.1:1", "us-east-1", None, aws_env)
    control = LightControl(setup, Config(presign_expires=100), lambda: None)  # type: ignore[arg-type,return-value]
    url, renew_at = control.presign(S3Location("b", "k"), "v1")
    assert "versionId=v1&" in url and "X-Amz-Expires=100&" in url
    assert renew_at > 0


# -- (d) a fresh process imports no botocore ------------------------------------------------


def test_eligible_run_imports_no_botocore(s3_server: Any, put_object: Any, tmp_path: Path) -> None:
    uri = put_object(os.urandom(256 << 10))
    code = (
        "import sys, fastpipe\n"
        "from fastpipe.stages import Checksum\n"
        f"r = fastpipe.run({uri!r}, [Checksum()], dest={str(tmp_path / 'o')!r}, force=True)\n"
        "assert r.passed, r.error\n"
        "loaded = [m for m in sys.modules if m.startswith(('botocore', 'urllib3', 'awscrt'))]\n"
        "print(r.download.control_plane, sorted(loaded))\n"
    )
    stdout = run_fresh(code)
    assert stdout.split("\n")[-2] == "light []"


def test_cli_run_imports_no_botocore(s3_server: Any, put_object: Any) -> None:
    """The CLI pre-imports botocore (without awscrt) only when the light plane cannot serve."""
    uri = put_object(os.urandom(4096))
    code = (
        "import sys, fastpipe.cli\n"
        f"code = fastpipe.cli.main(['run', {uri!r}, '--json', '--no-progress'])\n"
        "assert code == 0, code\n"
        "print(sorted(m for m in sys.modules if m.startswith(('botocore', 'awscrt'))))\n"
    )
    stdout = run_fresh(code)
    assert '"control_plane": "light"' in stdout
    assert stdout.splitlines()[-1] == "[]"


def test_bucket_in_another_region_is_named(proxy: Any, put_object: Any) -> None:
    """S3 answers a HEAD signed for the wrong region 301 with the bucket's region: the
    error names the object and both regions (through the fault proxy, which answers so)."""
    from faultproxy import Fault, fast_retry_config

    uri = put_object(b"abc")
    moved = Fault(
        "error",
        status=301,
        code="PermanentRedirect",
        headers=(("x-amz-bucket-region", "eu-west-3"),),
    )
    proxy.reset(None, head_plan=lambda n, request: moved)
    with pytest.raises(fastpipe.SourceError) as caught:
        fastpipe.run(uri, config=fast_retry_config(proxy.url, 1 << 20, "raw"))
    message = str(caught.value)
    assert uri in message and "region eu-west-3, not us-east-1" in message
    assert caught.value.report is not None
    assert caught.value.report.download.control_plane == "light"
    assert len(proxy.heads()) == 1  # not retried


def test_head_5xx_retried_as_botocore(proxy: Any, put_object: Any) -> None:
    """As botocore's client: four attempts in all, then the same 5xx error."""
    from faultproxy import Fault, fast_retry_config

    uri = put_object(b"abc")
    outcomes = []
    error = Fault("error", status=500, code="InternalError")
    for plane in ("auto", "botocore"):
        proxy.reset(None, head_plan=lambda n, request: error)
        config = fast_retry_config(proxy.url, 1 << 20, "raw", control_plane=plane)
        with pytest.raises(fastpipe.FastpipeError) as caught:
            fastpipe.run(uri, config=config)
        outcomes.append((type(caught.value), str(caught.value), len(proxy.heads())))
    assert outcomes[0] == outcomes[1]
    assert uri in outcomes[0][1] and outcomes[0][2] == 4


@pytest.mark.parametrize(
    ("env", "applies"),
    [
        ({}, False),
        ({"NO_PROXY": "127.0.0.1"}, False),
        ({"HTTPS_PROXY": "http://127.0.0.1:3"}, False),  # another scheme
        ({"HTTP_PROXY": "http://127.0.0.1:3"}, True),
        ({"http_proxy": "http://127.0.0.1:3"}, True),
        ({"HTTP_PROXY": "http://127.0.0.1:3", "NO_PROXY": "127.0.0.1"}, False),
        ({"HTTP_PROXY": ""}, False),
    ],
)
def test_proxy_check_agrees_with_urllib(
    aws_env: pytest.MonkeyPatch, env: dict[str, str], applies: bool
) -> None:
    """The shortcut (no proxy variable for the scheme: no urllib) decides as urllib does."""
    import urllib.request

    from fastpipe._http import proxy_configured

    for name, value in env.items():
        aws_env.setenv(name, value)
    endpoint = "http://127.0.0.1:9000"
    assert proxy_configured(endpoint) == applies
    by_urllib = "http" in urllib.request.getproxies_environment() and not (
        urllib.request.proxy_bypass_environment("127.0.0.1")  # type: ignore[attr-defined]
    )
    assert by_urllib == applies


@pytest.mark.parametrize(
    "text",
    [
        "Fri, 27 Nov 2026 19:35:47 GMT",
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
    ],
)
def test_http_date_reads_as_email_utils(text: str) -> None:
    from email.utils import parsedate_to_datetime

    from fastpipe._light import http_date

    assert http_date(text) == parsedate_to_datetime(text)
    assert http_date("not a date") is None


@pytest.mark.anyio
async def test_live_head_dict_is_botocores(s3_server: Any, s3_client: Any, bucket: str) -> None:
    """Every field the light HEAD maps equals botocore's ``head_object`` answer."""
    key = f"meta-{uuid.uuid4().hex} ü+"
    s3_client.put_object(
        Bucket=bucket,
        Key=key,
        Body=b"x" * 100,
        ContentType="text/plain",
        Metadata={"alpha": "1", "beta": "two"},
        ChecksumAlgorithm="SHA256",
    )
    theirs = s3_client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    control = S3Control(Config(endpoint_url=s3_server.endpoint_url))
    location = S3Location(bucket, key)
    light = control.light(location)
    assert light is not None
    try:
        ours = await light._head(location, encode_key_path(bucket, key), [])
    finally:
        await control.close()
    assert ours["LastModified"] is not None
    for name, value in ours.items():
        assert theirs.get(name) == value, name
    assert ours["ChecksumSHA256"] and ours["Metadata"] == {"alpha": "1", "beta": "two"}
