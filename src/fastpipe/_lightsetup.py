"""When the light control plane may stand in for botocore: decided once per engine.

The light plane (``_light``) signs with the standard library and sends HEAD over the raw
plane's HTTP; it must reach the same URL with the same credentials and region as the
botocore client would. So it serves only a setup simple enough to prove that: static keys
from the environment, no profile, a custom endpoint (botocore addresses every custom
endpoint path-style) without a path, the raw data plane with no proxy, and no AWS setting
in the environment or the shared config file that could change what botocore does.
Anything else keeps botocore (:func:`light_setup` returns None and says why).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ._config import Config
from ._http import default_port
from ._sigv4 import Credentials

#: AWS_* variables that leave botocore's S3 client as the light plane reproduces it:
#: the keys, the region, the endpoint (passed to botocore explicitly), files consulted
#: only when the keys are absent or read here, the instance metadata switch, and the CA
#: bundle (HEAD shares the raw data plane's TLS context, which trusts it as botocore does).
#: botocore 1.x reads no region from AWS_REGION: it is ignored by both planes.
_ALLOWED_ENV = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_EC2_METADATA_DISABLED",
        "AWS_CA_BUNDLE",
    }
)
#: Keys of the selected profile in the shared config file that do not change S3 calls
#: made with explicit keys and endpoint (retries are set on the client explicitly).
_HARMLESS_PROFILE_KEYS = frozenset(
    {"region", "output", "cli_pager", "cli_timestamp_format", "retry_mode", "max_attempts"}
)
#: Bucket names the endpoint rules address plainly (no access point ARN, no S3 Express
#: or other ``--`` suffix).
_PLAIN_BUCKET = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


@dataclass(frozen=True)
class LightSetup:
    """What the light plane signs with and where it sends requests."""

    credentials: Credentials
    region: str
    #: ``scheme://netloc`` of the endpoint, as the URLs start.
    base: str
    #: The Host header (and its signed value): lower case, default port dropped.
    host: str


def plain_bucket(bucket: str) -> bool:
    """True for a bucket name the light plane addresses as botocore does (path-style)."""
    return bool(_PLAIN_BUCKET.match(bucket)) and "--" not in bucket


def light_setup(config: Config) -> tuple[LightSetup | None, str]:
    """The light plane's setup, or None and the reason botocore is kept."""
    if config.control_plane == "botocore":
        return None, "Config.control_plane is botocore"
    profile, reason = _environment()
    reason = reason or _plane_reason(config)
    if reason:
        return None, reason
    endpoint = config.resolved_endpoint()
    if endpoint is None:
        return None, "no custom endpoint (AWS's own endpoints are left to botocore)"
    base, host, reason = _endpoint(endpoint)
    if reason:
        return None, reason
    region = _region(config, profile)
    creds = Credentials(
        os.environ["AWS_ACCESS_KEY_ID"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
        os.environ.get("AWS_SESSION_TOKEN") or None,
    )
    return LightSetup(creds, region, base, host), "static keys, custom endpoint"


def _environment() -> tuple[dict[str, str], str]:
    """The default profile of the shared config file, read once, and the reason the
    environment or that profile keeps botocore ("" if none)."""
    others = sorted(k for k in os.environ if k.startswith("AWS_") and k not in _ALLOWED_ENV)
    if others:
        return {}, f"{others[0]} is set"
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        return {}, "no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    profile, reason = _profile()
    odd = sorted(set(profile) - _HARMLESS_PROFILE_KEYS)
    return profile, reason or (f"the config file's profile sets {odd[0]}" if odd else "")


def _plane_reason(config: Config) -> str:
    if config.data_plane == "botocore":
        return "the botocore data plane is configured"
    if config.resolved_data_plane() == "botocore":
        return "a proxy applies to the endpoint"
    return ""


def _endpoint(endpoint: str) -> tuple[str, str, str]:
    """``(base, host, "")`` for an endpoint the light plane serves, else a reason."""
    parts = urlsplit(endpoint)
    scheme, netloc, hostname = parts.scheme, parts.netloc, parts.hostname or ""
    if scheme not in ("http", "https") or netloc != netloc.lower():
        return "", "", "the endpoint's scheme or host is not in lower case"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "", "", "the endpoint URL has a path"
    if parts.port == default_port(scheme) or "amazonaws." in hostname:
        return "", "", "the endpoint names a default port or an AWS host"
    return f"{scheme}://{netloc}", netloc, ""


def _region(config: Config, profile: dict[str, str]) -> str:
    """The region the botocore client is created with (``S3Control._client_options``):
    the config's, else botocore's configured one, else us-east-1, which we pass it."""
    if config.region:
        return config.region
    # botocore takes the variable when it is set, even empty: then the file is not read.
    if "AWS_DEFAULT_REGION" in os.environ:
        return os.environ["AWS_DEFAULT_REGION"] or "us-east-1"
    return profile.get("region") or "us-east-1"


def _config_path() -> str:
    return os.path.expanduser(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config")


def _profile() -> tuple[dict[str, str], str]:
    """The default profile of the shared config file (empty when there is none), or a
    reason it cannot be read."""
    path = _config_path()
    if not os.path.isfile(path):
        return {}, ""
    import configparser  # only when there is a file: its import costs about 2 ms

    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, UnicodeError, configparser.Error) as exc:
        return {}, f"the shared config file cannot be read ({type(exc).__name__})"
    merged: dict[str, str] = {}
    for section in ("default", "profile default"):
        if parser.has_section(section):
            merged.update(parser.items(section))
    return merged, ""
