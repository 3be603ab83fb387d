"""``fastpipe bench --predictability``: how well the engine predicts its own time.

One engine (library path, the time model learning as it goes) processes objects of each
size, ``--repeat`` times in a shuffled order, after ``--predict-warmup`` unrecorded
objects (3 by default). For every object it records the end-to-end seconds, the
prediction made before the first byte (``report.predicted_seconds``) and the end the ETA
announced at 10% and at 50% of the bytes (seconds so far + ``eta_seconds``, from the
first progress event at or past that fraction: besides the 0.2 s timer an event comes as
the bytes cross each 5% of the object, so it holds that fraction plus at most one receive
buffer; ``eta_10_done`` records the fraction actually in). Per size: p50, p90, max
and p90/p50 of the end-to-end time, and the same from each object's download start
(less its admission wait and its wait for its turn: what the objects ahead of it
cost), and the p90/p50 of the same calls through an ideal engine whose phases never vary
(:mod:`.ideal`, downloading in the engine's order: the spread the queue alone makes);
per estimate: the median and p90 of ``|predicted - actual| / actual``;
``predictability.json`` keeps every object and ``predicted_vs_actual.png`` plots the
predictions against the actual times. ``--download-order`` sets the engine's
``Config.download_order`` (default ``admission``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .. import Config, Engine, Progress
from .._console import format_size
from ..stages import Checksum, Chunk, Scan
from .ideal import ideal_times, phases_by_size
from .locals3 import LocalS3
from .machine import free_page_reporting, machine_info
from .s3 import ensure_bucket, s3_client, upload_file
from .shaping import loopback_port, shape_port

BUCKET = "fastpipe-predictability"
#: Fractions of the bytes at which the ETA is read.
ETA_POINTS = (0.1, 0.5)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (linear between order statistics; q in [0, 1])."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(seconds: Sequence[float]) -> dict[str, float | None]:
    """``p50``, ``p90`` and ``p90_over_p50`` of ``seconds`` (the ratio None at p50 0)."""
    p50, p90 = quantile(seconds, 0.5), quantile(seconds, 0.9)
    return {"p50": p50, "p90": p90, "p90_over_p50": p90 / p50 if p50 > 0 else None}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-size spread of the end-to-end time and per-estimate relative errors."""
    sizes: dict[str, Any] = {}
    for size in sorted({r["size"] for r in runs}):
        seconds = [r["seconds"] for r in runs if r["size"] == size]
        # From its download's start: less the admission wait and the wait for its turn.
        started = [
            r["seconds"] - (r.get("queued") or 0.0) - (r.get("turn_wait") or 0.0)
            for r in runs
            if r["size"] == size
        ]
        sizes[str(size)] = {
            "runs": len(seconds),
            **spread(seconds),
            "max": max(seconds),
            **{f"started_{k}": v for k, v in spread(started).items()},
        }
    errors: dict[str, Any] = {}
    for name in ("predicted", *(f"eta_{int(p * 100)}" for p in ETA_POINTS)):
        rel = [abs(r[name] - r["seconds"]) / r["seconds"] for r in runs if r.get(name)]
        errors[name] = {
            "n": len(rel),
            "median": statistics.median(rel) if rel else None,
            "p90": quantile(rel, 0.9) if rel else None,
        }
    return {"sizes": sizes, "errors": errors}


async def _one(engine: Engine, uri: str, size: int) -> dict[str, Any]:
    started = time.perf_counter()
    seen: dict[float, float] = {}
    at: dict[float, float] = {}  # when each point was read (seconds into the object)
    frac: dict[float, float] = {}  # the fraction of the bytes in at that event

    def on_progress(event: Progress) -> None:
        if event.eta_seconds is None or event.total <= 0:
            return
        for point in ETA_POINTS:
            if point not in seen and event.bytes_done >= point * event.total:
                at[point] = time.perf_counter() - started
                seen[point] = at[point] + event.eta_seconds
                frac[point] = event.bytes_done / event.total

    report = await engine.process(uri, [Checksum(), Scan(), Chunk()], progress=on_progress)
    model = report.model or {}
    load = model.get("load", {})
    record: dict[str, Any] = {
        "size": size,
        "seconds": report.seconds,
        "passed": report.passed,
        "predicted": report.predicted_seconds,
        "model_source": model.get("source"),
        # When it started and ended (seconds since the engine's first object).
        "started": started - _ORIGIN[0],
        "ended": time.perf_counter() - _ORIGIN[0],
        "queued": report.queued_seconds,
        "download_seconds": report.download.seconds,
        "stage_seconds": {s.name: s.seconds for s in report.stages},
        # The objects in flight the prediction assumed, and over the object's life.
        "in_flight": load.get("in_flight"),
        "in_flight_avg": load.get("in_flight_avg"),
        "in_flight_expected": load.get("in_flight_expected"),
        "weight": load.get("weight"),
        "neighbours": load.get("neighbours"),
        "shared": load.get("shared"),
        "share_seconds": load.get("share_seconds"),
        "lone_seconds": load.get("lone_seconds"),
        "connection_share": load.get("connection_share"),
        "turn_wait": report.download.turn_wait_seconds,
        "ahead_bytes": load.get("ahead_bytes"),
        "download_span": load.get("download_span"),
        "stay_seconds": load.get("stay_seconds"),
    }
    for point in ETA_POINTS:
        record[f"eta_{int(point * 100)}"] = seen.get(point)
        record[f"eta_{int(point * 100)}_at"] = at.get(point)
        record[f"eta_{int(point * 100)}_done"] = frac.get(point)
    return record


#: The bench's clock origin (set when the engine takes its first object).
_ORIGIN = [0.0]


def call_order(
    sizes: Iterable[int], repeat: int, warmup: int, seed: int = 0
) -> tuple[list[int], list[int]]:
    """``(warm-up, recorded)``: the sizes the bench calls, in order: ``warmup`` objects
    going through the sizes from the smallest, then each size ``repeat`` times, shuffled
    (the same order for the same seed)."""
    sizes = sorted(set(sizes))
    order = [size for size in sizes for _ in range(repeat)]
    random.Random(seed).shuffle(order)
    return [sizes[i % len(sizes)] for i in range(warmup)], order


def ideal_summary(
    runs: Sequence[dict[str, Any]],
    warm: Sequence[int],
    order: Sequence[int],
    in_flight: int,
    disk_budget: int,
    max_objects: int,
    weights: Mapping[int, float] | None = None,
) -> dict[str, Any]:
    """Per size, the p50, p90 and p90/p50 from the call of the same calls through an
    ideal engine, each phase its size's median in ``runs``, the downloads at the pace
    the engine had learned by the last object (:mod:`.ideal`): the spread the queue
    alone makes. Downloads in turn, or with ``weights`` (size -> connections) shared at
    the capacity the engine learned. Empty when a size has no measured phases."""
    learned = [r["shared"] for r in runs if r.get("shared")]
    key = "turn_capacity" if weights is None else "capacity"
    pace = learned[-1].get(key) if learned else None
    phases = phases_by_size(runs, pace)
    if not set(order) | set(warm) <= set(phases):
        return {}
    times = ideal_times(order, warm, in_flight, phases, disk_budget, max_objects, weights)
    return {
        str(size): spread([t for s, t in zip(order, times, strict=True) if s == size])
        for size in sorted(set(order))
    }


def connection_weights(sizes: Iterable[int], config: Config) -> dict[int, float]:
    """Each size's weight when downloads share the engine: the connections it holds
    (:meth:`Config.download_connections`, the engine's own rule)."""
    return {size: config.download_connections(size) for size in sizes}


def run_objects(
    uris: dict[int, str],
    warm: Sequence[int],
    order: Sequence[int],
    config: Config,
    in_flight: int = 1,
) -> tuple[list[dict[str, Any]], tuple[int, int]]:
    """Process the ``warm`` sizes, then the ``order`` ones (:func:`call_order`; ``size ->
    uri``), with one engine, ``in_flight`` at once after the warm-up (whose objects run
    one at a time with ``in_flight`` 1, else all at once: the model learns the regime it
    is measured in); the recorded runs, in the order they ended, and the engine's disk
    budget and object slots."""

    async def main() -> tuple[list[dict[str, Any]], tuple[int, int]]:
        async with Engine(config) as engine:
            runs = await _objects(engine)
            # Read after the objects: the first one's placement made them.
            return runs, (engine.budgets.disk_budget, engine.budgets.max_objects)

    async def _objects(engine: Engine) -> list[dict[str, Any]]:
        _ORIGIN[0] = time.perf_counter()
        if in_flight <= 1:
            for size in warm:
                await _one(engine, uris[size], size)
        else:  # the warm-up runs as the objects after it do: beside each other
            async with anyio.create_task_group() as tg:
                for size in warm:
                    tg.start_soon(_one, engine, uris[size], size)
        if in_flight <= 1:
            return [await _one(engine, uris[size], size) for size in order]
        runs: list[dict[str, Any]] = []
        queue = iter(order)

        async def worker() -> None:
            # Each takes the next size when its object ends: N stay in flight.
            for size in queue:
                runs.append(await _one(engine, uris[size], size))

        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(worker)
        return runs

    import anyio

    return anyio.run(main)


def format_summary(
    summary: dict[str, Any], in_flight: int = 1, order: str = "admission"
) -> str:
    """The predictability section as text."""
    lines = [
        "predictability (end-to-end seconds, library path, one engine learning, "
        f"{in_flight} in flight, download order {order}):"
    ]
    lines.append(
        f"  {'size':>10} {'runs':>4} {'p50':>7} {'p90':>7} {'max':>7} {'p90/p50':>7}"
        f"   from its download's start: {'p50':>7} {'p90':>7} {'p90/p50':>7}"
    )
    for size, s in summary["sizes"].items():
        ratio = f"{s['p90_over_p50']:.2f}" if s["p90_over_p50"] else "-"
        started = f"{s['started_p90_over_p50']:.2f}" if s["started_p90_over_p50"] else "-"
        lines.append(
            f"  {format_size(int(size)):>10} {s['runs']:>4} {s['p50']:7.3f} {s['p90']:7.3f} "
            f"{s['max']:7.3f} {ratio:>7}   {'':27}{s['started_p50']:7.3f} "
            f"{s['started_p90']:7.3f} {started:>7}"
        )
    if ideal := summary.get("ideal"):
        spread = ", ".join(
            f"{format_size(int(size))} {s['p90_over_p50']:.2f}"
            for size, s in ideal.items()
            if s["p90_over_p50"]
        )
        lines.append(
            f"  the same calls through an ideal engine (each phase its size's median here: "
            f"the queue's spread alone), p90/p50 from the call: {spread}"
        )
    lines.append("  |predicted - actual| / actual:")
    for name, e in summary["errors"].items():
        if e["median"] is None:
            lines.append(f"    {name:10} no data")
        else:
            lines.append(
                f"    {name:10} median {e['median']:.1%}  p90 {e['p90']:.1%}  (n={e['n']})"
            )
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], path: str) -> bool:
    """Predicted (before the first byte) against actual seconds; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [(r["seconds"], r["predicted"]) for r in runs if r.get("predicted")]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter([a for a, _ in points], [p for _, p in points], s=12)
    top = max([1e-3, *(max(a, p) for a, p in points)])
    ax.plot([0, top], [0, top], color="grey", linewidth=1)
    ax.set_xlabel("actual end-to-end seconds")
    ax.set_ylabel("predicted before the first byte")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def cmd_predictability(args: argparse.Namespace, link_rate: int | None = None) -> int:
    """Run the section on the embedded server (or ``--endpoint-url``), its traffic
    shaped to ``link_rate`` bits/s on lo while the objects run (None: unshaped); 0, or
    1 when an object failed."""
    sizes: list[int] = args.sizes or [64 << 20, 256 << 20, 1 << 30]
    os.makedirs(args.out, exist_ok=True)
    with contextlib.ExitStack() as stack:
        endpoint = args.endpoint_url
        if not endpoint:
            server = stack.enter_context(LocalS3())
            stack.enter_context(server.exported_env())
            endpoint = server.endpoint_url
        workdir = stack.enter_context(tempfile.TemporaryDirectory())
        uris = _upload(endpoint, args.bucket or BUCKET, sizes, workdir)
        # The server's writeback of what was just uploaded would land in the runs (its
        # dirty pages expire 30 s later, while the engine runs): flush it first.
        os.sync()
        # The model learns into a state file of its own: the bench never moves the user's.
        config = Config(
            endpoint_url=endpoint,
            model_path=os.path.join(args.out, "model.json"),
            download_order=getattr(args, "download_order", "admission"),
            disk_budget=getattr(args, "disk_budget", None),
            reuse_connections=getattr(args, "reuse_connections", False),
        )
        in_flight = getattr(args, "in_flight", 1)
        if link_rate is not None:  # after the upload: only the objects' bytes are shaped
            stack.enter_context(shape_port(loopback_port(endpoint), link_rate, say=print))
        # One order for the engine and for the ideal engine's replay of it.
        warm, calls = call_order(uris, args.repeat, args.predict_warmup)
        runs, (budget, slots) = run_objects(uris, warm, calls, config, in_flight=in_flight)
    summary = summarize(runs)
    # The ideal engine downloads as this one did: in turn, or shared by connections.
    weights = connection_weights(uris, config) if config.download_order == "shared" else None
    summary["ideal"] = ideal_summary(runs, warm, calls, in_flight, budget, slots, weights)
    reporting = free_page_reporting()  # one read for the record and the note
    with open(os.path.join(args.out, "predictability.json"), "w", encoding="utf-8") as f:
        record = {
            "in_flight": in_flight,
            "download_order": config.download_order,
            "link_rate": link_rate,  # bits/s the server's traffic was shaped to (None: not)
            # The engine's limits, which the ideal engine replays the calls with.
            "disk_budget": budget,
            "max_objects": slots,
            "machine": machine_info(reporting),
            "runs": runs,
            "summary": summary,
        }
        json.dump(record, f, indent=1)
    print(format_summary(summary, in_flight, config.download_order))
    if note := reporting.note():
        print(note)
    png = os.path.join(args.out, "predicted_vs_actual.png")
    if plot(runs, png):
        print(f"plot: {png}")
    return 0 if all(r["passed"] for r in runs) else 1


def _upload(endpoint: str, bucket: str, sizes: Sequence[int], workdir: str) -> dict[int, str]:
    """Upload one random object of each size; ``size -> uri``."""
    client = s3_client(endpoint)
    try:
        ensure_bucket(client, bucket)
        uris = {}
        for size in sizes:
            path = os.path.join(workdir, f"p-{size}")
            with open(path, "wb") as f:
                for offset in range(0, size, 16 << 20):
                    f.write(os.urandom(min(16 << 20, size - offset)))
            key = f"predictability/{size}"
            upload_file(client, path, bucket, key)
            os.unlink(path)
            uris[size] = f"s3://{bucket}/{key}"
        return uris
    finally:
        client.close()
