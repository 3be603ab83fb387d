"""Engine configuration: one frozen, self-validating dataclass."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction
from urllib.parse import urlsplit

from ._exceptions import UsageError
from ._sharing import weight_of

MiB = 1 << 20
#: S3's limit on parts of one object; the part plan never exceeds it.
MAX_PARTS = 10_000

_SIZE_RE = re.compile(r"^\s*(\d+)(?:\.(\d+))?\s*([A-Za-z]*)\s*$", re.ASCII)
#: Decimal units are powers of 1000 (``8MB`` is 8,000,000 bytes), binary ones of 1024.
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}


def parse_size(text: str | int) -> int:
    """Parse ``8MiB``, ``512KiB``, ``8MB``, ``4096`` (bytes) into a byte count.

    Decimal units are powers of 1000 (``kB``/``KB``, ``MB``, ``GB``, ``TB``), binary units
    powers of 1024 (``KiB``, ``MiB``, ``GiB``, ``TiB``); case does not matter. A bare
    ``K``/``M``/``G``/``T`` is refused as ambiguous. The arithmetic is exact (integers and
    fractions, never floats): ``1.5GiB`` is accepted because it is a whole number of bytes,
    ``1.3B`` is refused, and a number of any length keeps every digit.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise UsageError(f"not a size: {text!r} (examples: 8MiB, 512KiB, 8MB, 1048576)")
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 8MiB, 512KiB, 8MB, 1048576)")
    whole, fraction, unit = m.group(1), m.group(2) or "", m.group(3).upper()
    if unit in ("K", "M", "G", "T"):
        raise UsageError(
            f"ambiguous size unit in {text!r}: write {unit}B (powers of 1000) "
            f"or {unit}iB (powers of 1024)"
        )
    if unit not in _UNITS:
        raise UsageError(
            f"unknown size unit {m.group(3)!r} in {text!r} (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    value = Fraction(int(whole + fraction), 10 ** len(fraction)) * _UNITS[unit]
    if value.denominator != 1:
        raise UsageError(f"size is not a whole number of bytes: {text!r}")
    return int(value)


def format_size(n: float) -> str:
    """Format a byte count for humans (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


#: What botocore accepts as a region name: one DNS label, not all digits.
_REGION_RE = re.compile(r"^(?![0-9]+$)(?!-)[a-zA-Z0-9-]{1,63}(?<!-)$")


def check_endpoint_url(url: str, what: str) -> None:
    """Refuse an endpoint that botocore would reject with a traceback (``what`` names its
    origin in the message): it needs an http(s) scheme and a host."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = urlsplit(""), False
    if parts.username or parts.password:
        raise UsageError(f"{what} must not hold credentials (user:password@)")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise UsageError(f"{what} holds spaces or control characters: {url!r}")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or not port_ok:
        raise UsageError(
            f"{what} {url!r} is not an endpoint URL: expected http://HOST[:PORT] or "
            "https://HOST[:PORT]"
        )


#: ``Config.download_order``'s values (the first is the default).
DOWNLOAD_ORDERS = ("admission", "pass", "shared")


@dataclass(frozen=True)
class Config:
    """How the engine reads objects: transport settings and engine-wide limits.

    Where each object's bytes go (``dest``, ``force``, ``resume``, ``temp_dir``) is not
    here: it is per call (:func:`fastpipe.process`), so one engine and its S3 client serve
    calls that place their objects differently.

    Memory bound: about ``max_concurrency * receive_buffer + stream_buffer`` bytes of
    buffers (16 x 1 MiB + 1 MiB by default), whatever the object's size; parts are
    written to the file as they arrive and never held whole in memory. A 1 MiB receive
    buffer halves the socket reads and quarters the pwrites of 256 KiB ones, which
    measured 6-9% less client CPU per GiB here (2 MiB gave nothing more).

    ``part_size`` is raised so that an object has at most 10,000 parts.
    ``data_plane`` is ``"auto"`` (raw HTTP unless a proxy is configured), ``"raw"`` or
    ``"botocore"`` (stream aiobotocore's response bodies). ``control_plane`` is ``"auto"``
    (HEAD and presigning without botocore when the setup is simple: static keys in the
    environment, a custom endpoint, a region, the raw data plane; see the README) or
    ``"botocore"`` (always botocore's client). ``early_file_stages`` lets a
    file stage that reads in order overlap the download (see ``FileStage.reads_in_order``).
    """

    part_size: int = 8 * MiB
    max_concurrency: int = 16
    max_attempts: int = 5
    endpoint_url: str | None = None
    region: str | None = None
    verify_tls: bool = True
    data_plane: str = "auto"
    control_plane: str = "auto"
    receive_buffer: int = 1 * MiB
    stream_buffer: int = 1 * MiB
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    presign_expires: int = 3600
    #: Start an in-order file stage (``chunk``) while the download runs (still gated).
    early_file_stages: bool = True
    #: Budgets shared by every object the engine processes at once (``_budgets.py``):
    #: ranged GETs in flight, objects in progress, bytes of temp files (None: 90% of the
    #: free space where the temp files of the engine's first object go, i.e. its
    #: ``dest``'s folder, else its ``temp_dir``, else the system temp folder; at most the
    #: kernel's writeback threshold; a larger object is admitted alone), heavy stages at
    #: once (None: the CPU count).
    max_connections: int = 64
    max_objects: int = 8
    disk_budget: int | None = None
    file_stage_slots: int | None = None
    #: ``"admission"``: objects download in turn, each starting as the one before it
    #: reaches its tail (its last part handed out) or stalls for a second (an object's
    #: time depends on the objects ahead of it, not on those after); ``"pass"``: in turn,
    #: each starting once the one before has read all its bytes through its stream stages
    #: and its early file stage (one object's pass has the cores at a time: its time
    #: depends less on its neighbours' work; a slow pass holds the downloads behind it);
    #: ``"shared"``: every admitted object downloads at once, the connections shared
    #: (``_budgets.py``).
    download_order: str = "admission"
    #: Keep a fetcher's connection when it runs out of parts, for the next fetcher of
    #: this object or of the next one (raw data plane; at most ``max_concurrency`` wait,
    #: each at most 15 s). Off by default: a stream of small objects goes through faster,
    #: but the time of each object spreads more (measured in the README's "Connections
    #: between objects").
    reuse_connections: bool = False
    #: The time model's state file (``fastpipe calibrate`` writes it, the engine learns
    #: into it): None for ``$XDG_CACHE_HOME/fastpipe/model.json``, "" for none (in memory).
    model_path: str | None = None

    def __post_init__(self) -> None:
        if self.part_size < 1:
            raise UsageError(f"part_size must be at least 1 byte, got {self.part_size}")
        if not 1 <= self.max_concurrency <= 1024:
            raise UsageError(f"max_concurrency must be 1..1024, got {self.max_concurrency}")
        if not 1 <= self.max_attempts <= 100:
            raise UsageError(f"max_attempts must be 1..100, got {self.max_attempts}")
        self._check_budgets()
        self._check_choices()
        if self.receive_buffer < 4096 or self.stream_buffer < 4096:
            raise UsageError("receive_buffer and stream_buffer must be at least 4 KiB")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise UsageError("timeouts must be positive")
        if self.endpoint_url:
            check_endpoint_url(self.endpoint_url, "endpoint_url")
        if self.region is not None and not _REGION_RE.match(self.region):
            raise UsageError(
                f"region {self.region!r} is not a region name (letters, digits and '-', "
                "e.g. us-east-1)"
            )

    def _check_choices(self) -> None:
        choices = {
            "data_plane": ("auto", "raw", "botocore"),
            "control_plane": ("auto", "botocore"),
            "download_order": DOWNLOAD_ORDERS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                listed = ", ".join(allowed[:-1]) + " or " + allowed[-1]
                raise UsageError(f"{name} must be {listed}, got {value!r}")

    def _check_budgets(self) -> None:
        for name in ("max_connections", "max_objects", "disk_budget", "file_stage_slots"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise UsageError(f"{name} must be at least 1, got {value}")

    def resolved_endpoint(self) -> str | None:
        """The endpoint URL: this config's, else ``AWS_ENDPOINT_URL``, else botocore's.

        Raises :class:`UsageError` when ``AWS_ENDPOINT_URL`` is not an http(s) URL.
        """
        if self.endpoint_url:
            return self.endpoint_url
        from_env = os.environ.get("AWS_ENDPOINT_URL")
        if from_env:
            check_endpoint_url(from_env, "AWS_ENDPOINT_URL")
        return from_env or None

    def resolved_data_plane(self) -> str:
        """``data_plane`` with ``auto`` decided: ``raw`` unless a proxy applies to the
        endpoint (the raw plane speaks to the endpoint directly), then ``botocore``."""
        if self.data_plane != "auto":
            return self.data_plane
        from ._http import proxy_configured

        endpoint = self.resolved_endpoint() or "https://s3.amazonaws.com"
        return "botocore" if proxy_configured(endpoint) else "raw"

    def resolved_model_path(self) -> str | None:
        """The time model's state file (see ``model_path``), or None for none."""
        if self.model_path == "":
            return None
        from ._model import default_model_path

        return self.model_path or default_model_path()

    def download_connections(self, size: int) -> float:
        """The connections a download of ``size`` bytes holds, its weight when downloads
        share the engine: one per part, at most ``max_concurrency``, at least 1."""
        return weight_of(-(-size // self.plan_part_size(size)), self.max_concurrency)

    def plan_part_size(self, size: int) -> int:
        """Part size for an object of ``size`` bytes: at most MAX_PARTS parts."""
        part = self.part_size
        if size > part * MAX_PARTS:
            part = -(-size // MAX_PARTS)
            part = -(-part // MiB) * MiB  # round up to whole MiB
        return part
