"""The time model: an object's end-to-end seconds from its size and stage list.

It combines a fixed cost, the download rate and each stage's rate (bytes/s) the way the
engine overlaps them:

- the stream stages run in one thread, in sequence over each chunk, while the bytes
  arrive: the stream phase ends at ``max(S / download, S / stream)``, where ``stream`` is
  the combined rate ``1 / sum(1 / r_i)`` of the stream stages;
- the first file stage, when it reads in order (``FileStage.reads_in_order``, e.g.
  ``chunk``), runs alongside: it may not pass the download, and it takes its last window
  only after the stream stages passed;
- the other file stages are the tail, one after another, after the pass;
- with several objects in flight, after its admission wait, an object shares the
  engine's capacity with the others by weight (``_sharing``: weighted processor
  sharing, learned from the objects that shared it); until that is learned, it gets a
  share of the connections (its download rate) and of the heavy-stage slots (its file
  stages' rates);
- alone, once the objects of its pipeline (data plane and stages) spread in size, the
  line of their end-to-end seconds against their size (:meth:`TimeModel.size_line`)
  takes the arithmetic's place for the seconds; the arithmetic's phases stay what the
  ETA runs on.

Rates are learned online from the engine's finished objects (:meth:`TimeModel.learn`),
per stage identity (:meth:`Stage.cost_key`: the name plus the options that change the
cost, e.g. ``checksum:sha256``): a bounded window of recent rates per key and its median,
so that a few outliers (a stall, a cold cache) do not move it. Before any object, rates
measured by ``fastpipe calibrate`` are used, else conservative built-in ones; every rate
says where it came from and how many objects it rests on. The state is a small JSON file
(``Config.model_path``, by default ``$XDG_CACHE_HOME/fastpipe/model.json``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from ._sharing import (
    ALONE_BELOW,
    Shared,
    SharedPoint,
    SharingModel,
    load_figures,
    theil_sen,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

MiB = 1 << 20
GiB = 1 << 30
STATE_VERSION = 2
#: Bounds of the learned overlap factor (how much longer the pass runs than its slowest
#: phase alone, when the phases compete for the same cores).
OVERLAP_BOUNDS = (0.8, 3.0)
#: Observations kept per key: their recency-weighted median is the rate used.
WINDOW = 32
#: Objects after which an observation weighs half as much in that median: the model
#: follows a machine whose speed changes (another load came) within a few objects, and
#: one outlier still cannot move it.
HALF_LIFE = 8
#: Objects smaller than this teach no rate (their time is mostly latency), only the
#: fixed cost.
MIN_RATE_BYTES = 4 * MiB
#: Parts of the bytes downloaded (tenths) over which the ETA learns its own error.
ETA_BUCKETS = 10
#: Readings of a tenth (objects of about the size, alone or sharing alike) before its
#: correction applies.
MIN_ETA_READINGS = 3
#: Recent downloads within a factor of 2 of an object's size from which its download rate
#: is taken (fewer: the rate of every size).
MIN_ALIKE_DOWNLOADS = 3
#: Lone objects of a pipeline before its line of seconds against size predicts: the
#: first ones are cold (one at a time after 3 warm-up objects, a line through those 3
#: alone put the next four objects 14% long at the median).
MIN_LINE_OBJECTS = 6
#: Bounds of one reading's ratio (what remained in fact / what the ETA said).
ETA_RATIO_BOUNDS = (0.25, 4.0)
#: Bytes the early file stage takes after the stream stages passed (``chunk``'s window).
EARLY_LAST_WINDOW = 16 * MiB
#: How many bytes of evidence a learned rate counts for against what an object in flight
#: shows so far (the ETA trusts the object's own rate more as its bytes arrive).
PRIOR_BYTES = 64 * MiB
#: The same for the capacity an object sharing the engine saw so far: its first bytes
#: come slower (its parts start while the others' run), so they count for less.
SHARED_PRIOR_BYTES = 256 * MiB

#: Seconds of fixed cost per object (HEAD, temp file, commit) before anything is learned.
BUILTIN_FIXED = 0.5
#: Built-in rates (bytes/s), deliberately below what a modest machine gives: before any
#: data the model rather predicts too long than too short. Looked up by the exact key,
#: then its family (the part before ``:``), then the stage kind.
BUILTIN_RATES: dict[str, float] = {
    "download": 100 * MiB,
    "checksum:xxh3_64": 2 * GiB,
    "checksum:xxh3_128": 2 * GiB,
    "checksum:crc32c": 1 * GiB,
    "checksum:crc32": 500 * MiB,
    "checksum:sha256": 300 * MiB,
    "checksum:sha1": 400 * MiB,
    "checksum:md5": 300 * MiB,
    "checksum": 300 * MiB,
    "verify:crc32c": 1 * GiB,
    "verify:crc64nvme": 1 * GiB,
    "verify:crc32": 500 * MiB,
    "verify:sha1": 400 * MiB,
    "verify:sha256": 300 * MiB,
    "verify:md5": 300 * MiB,
    "verify:none": 10 * GiB,
    "verify": 300 * MiB,
    "limits": 10 * GiB,
    "scan": 500 * MiB,
    "chunk": 300 * MiB,
    "stream": 100 * MiB,
    "file": 100 * MiB,
}


def default_model_path() -> str:
    """``$XDG_CACHE_HOME/fastpipe/model.json`` (``~/.cache`` when the variable is unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastpipe", "model.json")


@dataclass(frozen=True)
class StageCost:
    """A stage as the model sees it: its cost key, its kind, and whether it runs early."""

    name: str
    key: str
    kind: str  # "stream" or "file"
    #: The first file stage, started while the download runs (it reads in order).
    early: bool = False


def stage_costs(
    stages: Sequence[Any], info: Any = None, *, early_file_stages: bool = True
) -> list[StageCost]:
    """The :class:`StageCost` of each stage, as the engine would run them.

    ``info`` (an ``ObjectInfo`` from HEAD, or None) lets a stage name its cost exactly
    (``verify`` picks its method from what S3 stored). The first file stage is early when
    it reads in order, has no timeout and ``early_file_stages`` is on (``Config``).
    """
    out: list[StageCost] = []
    first_file = True
    for stage in stages:
        kind = str(stage.kind.value if hasattr(stage.kind, "value") else stage.kind)
        key_of = getattr(stage, "cost_key", None)
        key = str(key_of(info)) if callable(key_of) else str(stage.name)
        early = False
        if kind == "file":
            early = (
                first_file
                and early_file_stages
                and bool(getattr(stage, "reads_in_order", False))
                and getattr(stage, "timeout", None) is None
                and (info is None or getattr(info, "size", 1) > 0)
            )
            first_file = False
        out.append(StageCost(str(stage.name), key, kind, early))
    return out


@dataclass(frozen=True)
class Load:
    """What one object gets of the engine while others run beside it.

    ``connection_share``: its fraction of the engine's connections (its download rate
    scales with it); ``heavy_share``: its fraction of the heavy-stage slots (its file
    stages' rates scale with it); ``admission_wait``: seconds before it is admitted.
    A lone object has ``Load()``.
    """

    connection_share: float = 1.0
    heavy_share: float = 1.0
    admission_wait: float = 0.0
    #: Objects in flight when it was admitted (itself included), its weight (connections
    #: it holds while downloading) and the ``(bytes left, weight)`` of the others
    #: downloading then: what the sharing model runs forward.
    in_flight: int = 1
    weight: float = 1.0
    neighbours: tuple[tuple[float, float], ...] = ()
    #: Downloads in turn (``Config.download_order`` "admission"): the ``neighbours`` are
    #: the objects ahead of it, whose bytes go first.
    in_turn: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.connection_share <= 1 and 0 < self.heavy_share <= 1):
            raise ValueError("shares must be within (0, 1]")
        if self.admission_wait < 0:
            raise ValueError("admission_wait must not be negative")

    @classmethod
    def shared(
        cls, in_flight: int, heavy_slots: int | None = None, admission_wait: float = 0.0
    ) -> Load:
        """``in_flight`` objects sharing the connections evenly and ``heavy_slots`` heavy
        slots (default: one each)."""
        n = max(1, in_flight)
        slots = n if heavy_slots is None else max(1, heavy_slots)
        return cls(1.0 / n, min(1.0, slots / n), admission_wait, n)


@dataclass(frozen=True)
class Rate:
    """One rate the model used: its key, bytes/s, where it came from, and on how many
    objects it rests (0 for calibrated and built-in rates)."""

    key: str
    rate: float
    source: str  # "learned", "calibrated" or "builtin"
    objects: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "rate": self.rate, "source": self.source, "objects": self.objects}


@dataclass(frozen=True)
class Position:
    """Where an object in flight is, for :meth:`Prediction.remaining`.

    ``downloaded``: bytes in the file; ``streamed``: bytes the stream stages consumed;
    ``stream_busy``: seconds the stream stages spent on them; ``download_seconds``:
    seconds since the download started; ``early_done``: bytes the early file stage
    consumed; ``file_stages_done``: tail stages finished; ``in_stage``: seconds spent in
    the tail stage now running; ``neighbours``: ``(bytes left, weight)`` of the other
    objects downloading now (None: not known); ``share_so_far``: the object's share of
    the engine integrated since it was admitted (seconds); ``after_download``: seconds
    since the download ended.
    """

    downloaded: int = 0
    streamed: int = 0
    stream_busy: float = 0.0
    download_seconds: float = 0.0
    early_done: int = 0
    file_stages_done: int = 0
    in_stage: float = 0.0
    neighbours: tuple[tuple[float, float], ...] | None = None
    share_so_far: float = 0.0
    #: Seconds since its download ended (0 while it runs).
    after_download: float = 0.0


def eta_bucket(done: int, size: int) -> int | None:
    """The tenth of the bytes ``done`` is in while the download runs (None after it)."""
    if size <= 0 or done >= size:
        return None
    return min(ETA_BUCKETS - 1, max(0, done * ETA_BUCKETS // size))


def eta_group(size: int, shared: bool) -> str:
    """Objects whose ETA errs alike: within a factor of 2 in size, alone or sharing (the
    engine corrects only those alone, see :meth:`TimeModel._predict_shared`)."""
    return f"{'shared' if shared else 'alone'}:{round(math.log2(max(size, 1)))}"


def settle_eta_readings(report: Any, end: float) -> None:
    """Turn the ETA readings the pass noted in ``report.model["eta"]`` (the tenth, the
    clock when read, the raw ETA) into what the model learns: the tenth, the raw ETA and
    the seconds that in fact remained to ``end`` (the object's end, same clock)."""
    eta = (getattr(report, "model", None) or {}).get("eta")
    if not eta or not eta.get("readings"):
        return
    eta["readings"] = [[int(b), float(raw), max(0.0, end - t)] for b, t, raw in eta["readings"]]


def _blend(model_rate: float, done: int, seconds: float, prior: float) -> float:
    """The rate to use for what is left: the object's own rate so far (``done`` bytes in
    ``seconds``) against the model's, weighted by bytes of evidence (time per byte is
    what averages)."""
    if done <= 0 or seconds <= 0:
        return model_rate
    weight = done / (done + prior)
    per_byte = weight * (seconds / done) + (1 - weight) / model_rate
    return 1.0 / per_byte if per_byte > 0 else model_rate


@dataclass(frozen=True)
class SizeLine:
    """End-to-end seconds against size for one pipeline (download and stages), alone."""

    intercept: float
    #: Seconds per byte.
    slope: float
    objects: int

    def seconds(self, size: int) -> float:
        """The line at ``size`` bytes."""
        return self.intercept + self.slope * size

    @property
    def seconds_per_gib(self) -> float:
        """The slope, per GiB."""
        return self.slope * (1 << 30)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the report's ``model["size_line"]``)."""
        return {
            "intercept_seconds": self.intercept,
            "seconds_per_gib": self.seconds_per_gib,
            "objects": self.objects,
        }


def pipeline_key(download_key: str | None, stages: Iterable[StageCost]) -> str:
    """What a size line is kept under: the data plane and each stage's cost key, the
    early file stage marked (it changes how the pass overlaps)."""
    keys = [c.key + ("@early" if c.early else "") for c in stages]
    return "|".join([download_key or "local", *keys])


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one object (seconds; see the module docstring)."""

    size: int
    seconds: float
    fixed: float
    #: How much longer than its slowest phase the pass runs (phases sharing the cores).
    overlap: float
    admission_wait: float
    download: float
    stream: float
    early: float
    tail: float
    #: What sets the length of the pass: ``download``, ``stream`` or the early stage's key.
    bound: str
    source: str
    stages: tuple[StageCost, ...]
    download_rate: Rate | None
    rates: tuple[Rate, ...]
    load: Load = field(default_factory=Load)
    objects: int = 0
    #: What the sharing model learned, when the object shares the engine (None: alone,
    #: or the shares arithmetic); the seconds it would take alone; the objects in flight
    #: over its life as the sharing model expects them.
    shared: Shared | None = None
    lone_seconds: float = 0.0
    in_flight_expected: float = 1.0
    #: The download as a start-up and a steady rate (see :meth:`TimeModel.download_line`;
    #: None: not learned): what the ETA applies to the bytes left once bytes arrive.
    download_start: float = 0.0
    steady_rate: float | None = None
    #: The ETA's learned correction per tenth of the bytes downloaded (what remained in
    #: fact / what it said, for objects of its group), and that group.
    eta_factors: tuple[float, ...] = ()
    eta_group: str = ""
    #: Alone: the line of seconds against size its pipeline's lone objects drew
    #: (:meth:`TimeModel.size_line`), when it gave the prediction; None: the arithmetic.
    size_line: SizeLine | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready: the report's ``model`` field."""
        return {
            "source": self.source,
            "objects": self.objects,
            "predicted_seconds": self.seconds,
            "fixed_seconds": self.fixed,
            "overlap_factor": self.overlap,
            "admission_wait": self.admission_wait,
            "download_seconds": self.download,
            "stream_seconds": self.stream,
            "early_seconds": self.early,
            "tail_seconds": self.tail,
            "bound": self.bound,
            "download": None if self.download_rate is None else self.download_rate.to_dict(),
            "download_start_seconds": self.download_start,
            "download_steady_rate": self.steady_rate,
            "size_line": None if self.size_line is None else self.size_line.to_dict(),
            "eta": {"group": self.eta_group, "factors": list(self.eta_factors), "readings": []},
            "stages": [
                dict(rate.to_dict(), name=cost.name, kind=cost.kind, early=cost.early)
                for cost, rate in zip(self.stages, self.rates, strict=True)
            ],
            "load": {
                "connection_share": self.load.connection_share,
                "heavy_share": self.load.heavy_share,
                "in_flight": self.load.in_flight,
                "weight": self.load.weight,
                "neighbours": len(self.load.neighbours),
                "in_turn": self.load.in_turn,
                "ahead_bytes": (
                    sum(b for b, _ in self.load.neighbours) if self.load.in_turn else None
                ),
                "in_flight_expected": self.in_flight_expected,
                "lone_seconds": self.lone_seconds,
                "shared": None if self.shared is None else self.shared.to_dict(),
            },
        }

    def _effective(self) -> tuple[float | None, list[float]]:
        """Download rate and per-stage rates under this prediction's load."""
        return _effective(self.download_rate, self.stages, self.rates, self.load)

    def remaining(self, at: Position, corrected: bool = True) -> float:
        """Seconds left to the end of the object from ``at``: the download left, the
        stream work left, the early file stage and the tail stages, blended with the rates
        the object shows so far (sharing the engine: with its own pace so far); while the
        download runs, times the ETA's learned correction (``corrected``)."""
        if self.shared is not None and at.neighbours is not None:
            raw = self._shared_remaining(self.shared, at)
        else:
            raw = self._left(at, own=True)
        return raw * self.eta_factor(at.downloaded) if corrected else raw

    def blend_eta(self, eta: float, elapsed: float) -> float:
        """``eta`` (the seconds left by the arithmetic and the object's own pace so far)
        weighed against this prediction less the ``elapsed`` seconds since the object's
        call: the object's evidence counts for the fraction of the predicted time it has
        run. Early on, when the first bytes came says more about the jitter of the first
        requests than about the end (alone, a 64 MiB object reached 10% of its bytes
        14-39 ms in and ended at about 0.09 s all the same). Nothing left is nothing
        left: 0 stays 0."""
        total = self.seconds
        if not total > 0 or elapsed < 0 or eta <= 0:
            return eta
        weight = min(1.0, elapsed / total)
        return weight * eta + (1.0 - weight) * max(0.0, total - elapsed)

    def eta_factor(self, downloaded: int) -> float:
        """The ETA's correction with ``downloaded`` bytes in (1 after the download)."""
        bucket = eta_bucket(downloaded, self.size)
        if bucket is None or bucket >= len(self.eta_factors):
            return 1.0
        return self.eta_factors[bucket]

    def _shared_remaining(self, shared: Shared, at: Position) -> float:
        """The download left, shared with the neighbours of the moment (it re-plans as
        they come and go) at the capacity this object saw so far blended with the
        learned one, then the seconds objects of its size took after the download. Once
        it ended: those seconds less the ones already past, or, when more, its stream
        stages' lag at the pace they showed so far (while the download runs, that pace
        says more about the cores its download took than about the stages)."""
        left = float(self.size - at.downloaded)
        if left <= 0:
            return max(shared.after - at.after_download, self._left(at, own=True))
        capacity = shared.capacity
        if at.downloaded <= 0:
            left += shared.overhead  # its first requests are still ahead
        elif at.share_so_far > 0:  # its own capacity so far, its overhead counted as done
            done = at.downloaded + shared.overhead
            weight = at.downloaded / (at.downloaded + SHARED_PRIOR_BYTES)
            per_byte = weight * at.share_so_far / done + (1 - weight) / capacity
            capacity = 1.0 / per_byte
        seconds, _ = replace(shared, capacity=capacity).finish(
            left, self.load.weight, at.neighbours or (), in_turn=self.load.in_turn
        )
        return seconds + shared.after

    def _download_left(self, d: float, at: Position, prior: float) -> float:
        """Seconds of download left at the effective rate ``d``, blended with the object's
        own rate so far. With a learned line: the bytes left at the steady rate (its
        start-up is behind once bytes arrive; an average rate that holds it would
        stretch the bytes left), the object's own rate over the seconds since its
        start-up."""
        left = max(0, self.size - at.downloaded)
        rate = self.download_rate
        if self.steady_rate is None or rate is None or rate.rate <= 0:
            return left / _blend(d, at.downloaded, at.download_seconds, prior)
        steady = self.steady_rate * d / rate.rate  # under the load's share, as ``d``
        if at.downloaded <= 0:
            return max(0.0, self.download_start - at.download_seconds) + left / steady
        since = at.download_seconds - self.download_start
        return left / _blend(steady, at.downloaded, since, prior)

    def _left(self, at: Position, own: bool) -> float:
        """The arithmetic of :meth:`remaining` (``own``: blended with the object's
        rates so far; else at the model's rates only)."""
        size = self.size
        d, rates = self._effective()
        trusted = own and self.download_rate is not None and self.download_rate.objects > 0
        prior_dl = PRIOR_BYTES if trusted else (0.0 if own else math.inf)
        dl_left = 0.0 if d is None else self._download_left(d, at, prior_dl)
        stream_rate = _combined(
            [r for c, r in zip(self.stages, rates, strict=True) if c.kind == "stream"]
        )
        stream_left = dl_left
        if stream_rate is not None:
            prior_s = PRIOR_BYTES if any(r.objects for r in self.rates) else 0.0
            prior_s = prior_s if own else math.inf
            stream_rate = _blend(stream_rate, at.streamed, at.stream_busy, prior_s)
            stream_left = max(dl_left, max(0, size - at.streamed) / stream_rate)
        pass_left = stream_left
        tail = [(c, r) for c, r in zip(self.stages, rates, strict=True) if c.kind == "file"]
        if tail and tail[0][0].early:
            c_rate = tail.pop(0)[1]
            last = min(EARLY_LAST_WINDOW, size)
            before = max(0, size - last - at.early_done) / c_rate
            pass_left = max(before, stream_left) + max(0, min(last, size - at.early_done)) / c_rate
        if at.downloaded < size:  # the phases still share the cores
            pass_left *= self.overlap
        tail_left = 0.0
        for i, (_, r) in enumerate(tail):
            if i < at.file_stages_done:
                continue
            spent = at.in_stage if i == at.file_stages_done else 0.0
            tail_left += max(0.0, size / r - spent)
        return pass_left + tail_left


def _effective(
    download: Rate | None, stages: Sequence[StageCost], rates: Sequence[Rate], load: Load
) -> tuple[float | None, list[float]]:
    """The download rate and per-stage rates under ``load`` (its connection share for the
    download, its heavy share for the file stages)."""
    d = None if download is None else download.rate * load.connection_share
    effective = [
        r.rate * (load.heavy_share if c.kind == "file" else 1.0)
        for c, r in zip(stages, rates, strict=True)
    ]
    return d, effective


def _combined(rates: Iterable[float]) -> float | None:
    """Rate of stages run one after another over the same bytes: ``1 / sum(1 / r)``."""
    rates = list(rates)
    if not rates:
        return None
    return 1.0 / sum(1.0 / r for r in rates)


def combine(
    size: int,
    download: float | None,
    stages: Sequence[StageCost],
    rates: Sequence[float],
) -> tuple[float, float, float, float, str]:
    """The overlap arithmetic: ``(download, stream_end, early_end, tail, bound)`` seconds.

    ``download`` is the download rate (None: a local file), ``rates`` each stage's rate
    (bytes/s, already scaled by any load). The pass ends at ``max(stream_end, early_end)``;
    the tail follows it.
    """
    t_dl = size / download if download else 0.0
    stream_rate = _combined(r for c, r in zip(stages, rates, strict=True) if c.kind == "stream")
    t_work = size / stream_rate if stream_rate else 0.0
    stream_end = max(t_dl, t_work)
    bound = "stream" if t_work > t_dl else "download"
    early_end = 0.0
    tail = 0.0
    for cost, rate in zip(stages, rates, strict=True):
        if cost.kind != "file":
            continue
        if cost.early:
            last = min(EARLY_LAST_WINDOW, size)
            before = (size - last) / rate
            early_end = max(before, stream_end) + last / rate
            if before > stream_end:
                bound = cost.key
        else:
            tail += size / rate
    return t_dl, stream_end, early_end, tail, bound


@dataclass(frozen=True)
class Observation:
    """What one finished object teaches: sizes and seconds of each phase.

    ``stages`` pairs each stage's cost with the seconds it worked (for the early file
    stage, its busy time when known, else its wall time); ``load`` is what the object had
    of the engine, so that rates under sharing are scaled back to a lone object's.
    """

    size: int
    seconds: float
    stages: tuple[tuple[StageCost, float], ...]
    download_key: str | None = "download"
    download_bytes: int = 0
    download_seconds: float = 0.0
    load: Load = field(default_factory=Load)
    #: Bytes taken from a resumed temp file: the total time says little then.
    reused_bytes: int = 0
    #: Objects in flight over its life, time-averaged (itself included; None: unknown);
    #: its weight, its share of the engine integrated over its download, the download's
    #: span and its whole stay after admission (seconds): what the sharing model learns.
    in_flight_avg: float | None = None
    weight: float = 1.0
    share_seconds: float | None = None
    download_span: float | None = None
    stay_seconds: float | None = None
    #: In turn: the bytes ahead of it when it was predicted (None: not in turn).
    ahead_bytes: float | None = None
    #: The ETA's readings (tenth, raw ETA, seconds that remained) and their group.
    eta_readings: tuple[tuple[int, float, float], ...] = ()
    eta_group: str | None = None

    @classmethod
    def from_report(
        cls,
        report: Any,
        costs: Sequence[StageCost],
        *,
        download_key: str | None = "download",
        load: Load | None = None,
    ) -> Observation | None:
        """An observation from a :class:`~fastpipe.Report`, or None when the object did
        not pass (a stopped object did only part of its work)."""
        if not report.passed or report.size is None:
            return None
        dl = report.download
        plane = getattr(dl, "plane", None) or getattr(dl, "path", None)
        if str(getattr(plane, "value", plane)) == "local":
            download_key = None
        return cls(
            size=int(report.size),
            seconds=float(report.seconds),
            stages=tuple(
                (cost, float(stage.seconds))
                for cost, stage in zip(costs, report.stages, strict=True)
            ),
            download_key=download_key,
            download_bytes=int(dl.bytes),
            download_seconds=float(dl.seconds),
            load=load or Load(),
            reused_bytes=int(getattr(dl, "reused_bytes", 0) or 0),
        )


def shared_point(obs: Observation) -> SharedPoint | None:
    """What an object that shared the engine teaches (None: figures missing)."""
    share, span, stay = obs.share_seconds, obs.download_span, obs.stay_seconds
    if not share or not span or stay is None or obs.in_flight_avg is None:
        return None
    others = max(0.0, obs.in_flight_avg - 1.0)
    # Its average share was weight / (weight + others' weight): the others' weight.
    others_weight = obs.weight * max(0.0, span / share - 1.0)
    return SharedPoint(
        size=obs.size,
        weight=obs.weight,
        capacity=obs.download_bytes / share,
        before=obs.seconds - obs.load.admission_wait - stay,
        after=stay - span,
        others=others,
        neighbour_weight=others_weight / others if others > 0.05 else 0.0,
        ahead=-1.0 if obs.ahead_bytes is None else max(0.0, obs.ahead_bytes),
        span=span,
    )


class TimeModel:
    """Predicts end-to-end seconds and learns from finished objects (thread-safe).

    ``calibrated`` holds rates measured by ``fastpipe calibrate`` (bytes/s by key);
    learned rates, once a key has any, take their place.
    """

    def __init__(
        self, calibrated: Mapping[str, float] | None = None, path: str | None = None
    ) -> None:
        self.path = path
        self.calibrated: dict[str, float] = dict(calibrated or {})
        self._rates: dict[str, deque[float]] = {}
        #: (bytes, seconds) of recent downloads per key, scaled to a lone object's.
        self._lines: dict[str, deque[tuple[float, float]]] = {}
        #: The ETA's ratios (what remained / what it said) per ``group:tenth``.
        self._eta: dict[str, deque[float]] = {}
        #: (pass seconds at the object's own rates, its time less the tail and the wait)
        self._fixed: deque[tuple[float, float]] = deque(maxlen=WINDOW)
        #: (bytes, seconds less the admission wait) of recent lone objects per pipeline.
        self._sizes: dict[str, deque[tuple[float, float]]] = {}
        #: What sharing the engine does (objects in flight beside others).
        self.sharing = SharingModel()
        self.objects = 0
        self._lock = threading.Lock()
        self._dirty = False

    # -- rates ---------------------------------------------------------------------------

    def rate(self, key: str, kind: str = "stream") -> Rate:
        """The rate used for ``key``: learned, else calibrated, else built-in."""
        with self._lock:
            window = self._rates.get(key)
            if window:
                return Rate(key, recent_median(window), "learned", len(window))
        if key in self.calibrated:
            return Rate(key, self.calibrated[key], "calibrated")
        family = key.split(":", 1)[0]
        base = key.rsplit("-lanes", 1)[0]
        for candidate in (base, family):
            if candidate in self.calibrated and candidate != key:
                return Rate(key, self.calibrated[candidate], "calibrated")
        for candidate in (key, base, family, kind):
            if candidate in BUILTIN_RATES:
                return Rate(key, BUILTIN_RATES[candidate], "builtin")
        return Rate(key, BUILTIN_RATES["stream"], "builtin")

    def download_rate(self, key: str, size: int) -> Rate:
        """The download rate for an object of ``size`` bytes: the recency-weighted median
        over the recent downloads within a factor of 2 of its size, once there are
        :data:`MIN_ALIKE_DOWNLOADS`; else :meth:`rate`'s. A download's start-up weighs
        more on a small object, and what the server and the page cache do weighs more on
        a large one: one rate for every size overshoots one end and undershoots the
        other."""
        with self._lock:
            points = list(self._lines.get(key, ()))
        alike = [b / s for b, s in points if size / 2 <= b <= size * 2 and s > 0]
        if len(alike) >= MIN_ALIKE_DOWNLOADS:
            return Rate(key, recent_median(alike), "learned", len(alike))
        return self.rate(key, "download")

    def download_line(self, key: str) -> tuple[float, float] | None:
        """``(start seconds, steady bytes/s)`` of the downloads under ``key``: a Theil-Sen
        line of seconds against bytes over the recent ones (its intercept the start-up:
        the first requests, the parts ramping up; its slope the time per byte once they
        run). None until the sizes are spread enough to tell them apart."""
        with self._lock:
            points = list(self._lines.get(key, ()))
        line = rising_line(points)
        return None if line is None else (line[0], 1.0 / line[1])

    def size_line(self, pipeline: str) -> SizeLine | None:
        """The end-to-end seconds of ``pipeline``'s recent lone objects as a line in their
        size (Theil-Sen: the median pairwise slope, then the recency-weighted median
        intercept); None until there are :data:`MIN_LINE_OBJECTS` and their sizes spread
        (pairs a fifth apart).

        Alone, what sets an object's time on a machine whose cores the download, the S3
        server and the stages share is how they share them, and that changes with the
        size: a small object's early file stage lags after its download, a large one's
        download slows beside it. The arithmetic's one overlap factor for every size
        leaves a bias per size (one at a time, 64 MiB objects 8-11% long at the median
        and 256 MiB ones 6-10% short); the objects' own times lie on a line."""
        with self._lock:
            points = list(self._sizes.get(pipeline, ()))
        line = rising_line(points) if len(points) >= MIN_LINE_OBJECTS else None
        return None if line is None else SizeLine(line[0], line[1], len(points))

    def eta_factors(self, group: str) -> tuple[float, ...]:
        """The ETA's correction per tenth of the bytes for objects of ``group``: the
        recency-weighted median of its readings' ratios, 1 before :data:`MIN_ETA_READINGS`.
        The arithmetic leaves out what it cannot see (a download's ramp-up, the stages'
        pull on the cores at each point of it); what it erred by, it learns here."""
        with self._lock:
            windows = [self._eta.get(f"{group}:{b}") for b in range(ETA_BUCKETS)]
        return tuple(
            recent_median(w) if w and len(w) >= MIN_ETA_READINGS else 1.0 for w in windows
        )

    def _learn_eta(self, obs: Observation) -> None:
        low, high = ETA_RATIO_BOUNDS
        if not obs.eta_group or obs.reused_bytes:
            return
        with self._lock:
            for bucket, raw, actual in obs.eta_readings:
                if raw > 0 and math.isfinite(raw) and math.isfinite(actual):
                    key = f"{obs.eta_group}:{int(bucket)}"
                    window = self._eta.setdefault(key, deque(maxlen=WINDOW))
                    window.append(min(max(actual / raw, low), high))

    def fixed(self) -> tuple[float, str, int]:
        """The fixed cost per object: ``(seconds, source, objects)``."""
        fixed, _, source, objects = self.fit()
        return fixed, source, objects

    def fit(self) -> tuple[float, float, str, int]:
        """``(fixed seconds, overlap factor, source, objects)``.

        Each object gives a point (its pass at its own rates, its time less its tail and
        admission wait); a Theil-Sen line through the window's points (the median of the
        pairwise slopes, then the recency-weighted median intercept) gives the overlap
        factor (the slope: on a machine whose cores the download and the stages share, the
        pass runs longer than its slowest phase alone) and the fixed cost (the intercept).
        With too narrow a spread of sizes the factor is 1 and the fixed cost the median
        residual.
        """
        with self._lock:
            points = list(self._fixed)
        if not points:
            return BUILTIN_FIXED, 1.0, "builtin", 0
        factor = theil_sen(points)
        low, high = OVERLAP_BOUNDS
        factor = 1.0 if factor is None else min(max(factor, low), high)
        # The intercept follows the recent objects (the fixed cost moves with the load).
        fixed = max(0.0, recent_median([y - factor * x for x, y in points]))
        return fixed, factor, "learned", len(points)

    @property
    def source(self) -> str:
        """``learned`` once an object was learned, ``calibrated`` after a calibration,
        else ``builtin``."""
        if self.objects or self._rates:
            return "learned"
        return "calibrated" if self.calibrated else "builtin"

    # -- prediction ----------------------------------------------------------------------

    def predict(
        self,
        size: int,
        stages: Sequence[StageCost],
        *,
        download_key: str | None = "download",
        load: Load | None = None,
    ) -> Prediction:
        """End-to-end seconds for an object of ``size`` bytes through ``stages``.

        ``download_key`` names the download's rate (None: a local file, read in place).
        """
        load = load or Load()
        shared = self.sharing.fit(size) if load.in_flight > 1 and download_key else None
        if shared is not None and load.in_turn:
            shared = shared.in_turn()
        if shared is not None:
            return self._predict_shared(size, stages, download_key, load, shared)
        stages = tuple(stages)
        dl_rate = self.download_rate(download_key, size) if download_key else None
        rates = tuple(self.rate(c.key, c.kind) for c in stages)
        d, effective = _effective(dl_rate, stages, rates, load)
        t_dl, stream_end, early_end, tail, bound = combine(size, d, stages, effective)
        fixed, factor, _, _ = self.fit()
        lone_seconds = fixed + factor * max(stream_end, early_end) + tail
        # Alone (nothing to share), the pipeline's own line once it has one.
        size_line = (
            self.size_line(pipeline_key(download_key, stages)) if load.in_flight <= 1 else None
        )
        if size_line is not None:
            lone_seconds = size_line.seconds(size)
        line = self.download_line(download_key) if download_key else None
        group = eta_group(size, shared=False)
        return Prediction(
            size=size,
            seconds=load.admission_wait + lone_seconds,
            fixed=fixed,
            overlap=factor,
            admission_wait=load.admission_wait,
            download=t_dl,
            stream=stream_end,
            early=early_end,
            tail=tail,
            bound=bound,
            source=self.source,
            stages=stages,
            download_rate=dl_rate,
            rates=rates,
            load=load,
            objects=self.objects,
            lone_seconds=lone_seconds,
            download_start=line[0] if line else 0.0,
            steady_rate=line[1] if line else None,
            eta_factors=self.eta_factors(group) if download_key else (),
            eta_group=group if download_key else "",
            size_line=size_line,
        )

    def _predict_shared(
        self,
        size: int,
        stages: Sequence[StageCost],
        download_key: str | None,
        load: Load,
        shared: Shared,
    ) -> Prediction:
        """Beside others: the seconds before the download, the download shared by weight
        with the neighbours (and typical objects up to the usual count: a closed loop),
        and the seconds after it."""
        lone = self.predict(size, stages, download_key=download_key)
        download, expected = shared.finish(
            size + shared.overhead, load.weight, load.neighbours, in_turn=load.in_turn
        )
        # No ETA correction beside others: there its errors are spread (the neighbours'
        # comings and goings), not biased, and a factor learned from them adds noise.
        return replace(
            lone,
            eta_factors=(),
            eta_group="",
            seconds=load.admission_wait + shared.before + download + shared.after,
            admission_wait=load.admission_wait,
            load=replace(load, connection_share=1.0, heavy_share=1.0),
            shared=shared,
            lone_seconds=lone.seconds,
            in_flight_expected=expected,
            size_line=None,  # its time alone may come from the line; this one does not
        )

    # -- learning ------------------------------------------------------------------------

    def _add(self, key: str, value: float) -> None:
        if not math.isfinite(value) or value <= 0:
            return
        self._rates.setdefault(key, deque(maxlen=WINDOW)).append(value)

    def learn(self, obs: Observation) -> None:
        """Take one finished object's timings into the windows of its keys.

        Rates are learned from objects of at least :data:`MIN_RATE_BYTES` (scaled back by
        the load's shares); the fixed cost from every object: what its total time leaves
        once the pass and the tail (at its own rates when it is large enough, else at the
        model's) are taken off. A resumed object teaches no fixed cost.
        """
        self._learn_eta(obs)
        if obs.in_flight_avg is not None and obs.in_flight_avg >= ALONE_BELOW:
            self._learn_shared(obs)
            return
        size = obs.size
        big = size >= MIN_RATE_BYTES
        with self._lock:
            if (
                obs.download_key
                and obs.download_bytes >= MIN_RATE_BYTES
                and obs.download_seconds > 0
            ):
                rate = obs.download_bytes / obs.download_seconds / obs.load.connection_share
                self._add(obs.download_key, rate)
                lone = obs.download_seconds * obs.load.connection_share
                line = self._lines.setdefault(obs.download_key, deque(maxlen=WINDOW))
                line.append((float(obs.download_bytes), lone))
            if big:
                for cost, seconds in obs.stages:
                    if seconds > 0:
                        share = obs.load.heavy_share if cost.kind == "file" else 1.0
                        self._add(cost.key, size / seconds / share)
            self.objects += 1
            self._dirty = True
        if obs.reused_bytes:
            return
        pass_seconds, tail = self._pass_and_tail(obs, big)
        rest = obs.seconds - obs.load.admission_wait - tail
        if math.isfinite(rest) and pass_seconds >= 0:
            with self._lock:
                self._fixed.append((pass_seconds, max(0.0, rest)))
        alone = obs.seconds - obs.load.admission_wait
        if obs.load.in_flight <= 1 and math.isfinite(alone) and alone > 0:
            key = pipeline_key(obs.download_key, (c for c, _ in obs.stages))
            with self._lock:
                window = self._sizes.setdefault(key, deque(maxlen=WINDOW))
                window.append((float(obs.size), alone))

    def _learn_shared(self, obs: Observation) -> None:
        """An object that shared the engine teaches the sharing model (the capacity it
        saw, its seconds before and after the download); the lone rates stay as they are."""
        with self._lock:
            point = shared_point(obs)
            if point is not None:
                self.sharing.add(point)
            self.objects += 1
            self._dirty = True

    def _pass_and_tail(self, obs: Observation, own: bool) -> tuple[float, float]:
        costs = [c for c, _ in obs.stages]
        if own:
            rates = [
                obs.size / s if s > 0 else self.rate(c.key, c.kind).rate for c, s in obs.stages
            ]
            d: float | None = None
            if obs.download_key:
                d = (
                    obs.download_bytes / obs.download_seconds
                    if obs.download_bytes and obs.download_seconds > 0
                    else self.rate(obs.download_key, "download").rate
                )
        else:
            dl = self.rate(obs.download_key, "download") if obs.download_key else None
            model_rates = [self.rate(c.key, c.kind) for c in costs]
            d, rates = _effective(dl, costs, model_rates, obs.load)
        _, stream_end, early_end, tail, _ = combine(obs.size, d, costs, rates)
        return max(stream_end, early_end), tail

    # -- state file ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-ready data (what :meth:`save` writes)."""
        with self._lock:
            return {
                "version": STATE_VERSION,
                "objects": self.objects,
                "fixed": [list(p) for p in self._fixed],
                "rates": {k: list(v) for k, v in self._rates.items()},
                "download_lines": {k: [list(p) for p in v] for k, v in self._lines.items()},
                "size_lines": {k: [list(p) for p in v] for k, v in self._sizes.items()},
                "eta": {k: list(v) for k, v in self._eta.items()},
                "calibrated": dict(self.calibrated),
                "sharing": self.sharing.to_list(),
            }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | None = None) -> TimeModel:
        """A model from :meth:`to_dict` data; ValueError when it is not one."""
        if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
            raise ValueError("not a fastpipe time model (unknown version)")
        model = cls(_floats(data.get("calibrated", {})), path)
        model._rates = _windows(data.get("rates"), _positive)
        model._eta = _windows(data.get("eta"), _positive)
        model._lines = _windows(
            data.get("download_lines"), lambda v: [p for p in _pairs(v) if min(p) > 0]
        )
        model._sizes = _windows(
            data.get("size_lines"), lambda v: [(x, y) for x, y in _pairs(v) if x >= 0 and y > 0]
        )
        for point in list(data.get("fixed", [])):
            x, y = (float(v) for v in point)
            if math.isfinite(x) and math.isfinite(y) and x >= 0 and y >= 0:
                model._fixed.append((x, y))
        model.sharing = SharingModel.from_list(data.get("sharing"))
        model.objects = int(data.get("objects", 0))
        return model

    @classmethod
    def load(cls, path: str) -> TimeModel:
        """The model saved at ``path``; an empty one when there is none or it is unusable
        (said in a warning: the engine works without it)."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f), path)
        except FileNotFoundError:
            return cls(path=path)
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("time model %s unusable, starting from built-in rates: %s", path, exc)
            return cls(path=path)

    def save(self, path: str | None = None, *, only_if_changed: bool = False) -> None:
        """Write the state to ``path`` (default: where it was loaded from) atomically, 0600."""
        path = path or self.path
        if not path or (only_if_changed and not self._dirty):
            return
        data = self.to_dict()
        self._dirty = False
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: mode 0600
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def rising_line(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """``(intercept, slope)`` of a Theil-Sen line through ``points`` (oldest first): the
    median pairwise slope, then the recency-weighted median intercept, at least 0. None
    when the slope is unknown (too few points, x not spread) or not positive."""
    slope = theil_sen(points)
    if slope is None or slope <= 0:
        return None
    return max(0.0, recent_median([y - slope * x for x, y in points])), slope


def recent_median(values: Sequence[float], half_life: float = HALF_LIFE) -> float:
    """The weighted median of ``values`` (oldest first), each weighing half as much as
    the one ``half_life`` places after it: the value where half the weight is on either
    side (the mean of the two middle ones on an exact tie, as the plain median)."""
    n = len(values)
    weighted = sorted((v, 0.5 ** ((n - 1 - i) / half_life)) for i, v in enumerate(values))
    half = sum(w for _, w in weighted) / 2
    seen = 0.0
    for i, (value, weight) in enumerate(weighted):
        seen += weight
        if math.isclose(seen, half, rel_tol=1e-12) and i + 1 < n:
            return (value + weighted[i + 1][0]) / 2
        if seen > half:
            return value
    return weighted[-1][0]


def _windows(data: Any, clean: Callable[[Any], list[_T]]) -> dict[str, deque[_T]]:
    """The non-empty windows of a state file's ``key -> values`` mapping, each value list
    cleaned by ``clean`` (what is unusable dropped), the most recent :data:`WINDOW` kept."""
    windows = {
        str(key): deque(clean(values), maxlen=WINDOW) for key, values in dict(data or {}).items()
    }
    return {key: window for key, window in windows.items() if window}


def _pairs(values: Any) -> list[tuple[float, float]]:
    """The finite ``(x, y)`` pairs of a JSON list (others dropped)."""
    out = []
    for pair in list(values or []):
        with contextlib.suppress(TypeError, ValueError):
            x, y = (float(v) for v in pair)
            if math.isfinite(x) and math.isfinite(y):
                out.append((x, y))
    return out


def _positive(values: Any) -> list[float]:
    out = []
    for v in list(values or []):
        x = float(v)
        if math.isfinite(x) and x > 0:
            out.append(x)
    return out


def _floats(mapping: Any) -> dict[str, float]:
    out = {}
    for key, value in dict(mapping or {}).items():
        x = float(value)
        if math.isfinite(x) and x > 0:
            out[str(key)] = x
    return out


def observation_from_described(report: Any) -> Observation | None:
    """The :class:`Observation` of a report that carries its prediction (``report.model``,
    as :meth:`Prediction.describe` writes it); None when it has none or did not pass.

    An early file stage's ``busy_seconds`` (its working time, without the waits for bytes)
    replaces its wall seconds.
    """
    described = report.model
    if not report.passed or not described:
        return None
    entries = described["stages"]
    costs = [StageCost(e["name"], e["key"], e["kind"], bool(e["early"])) for e in entries]
    download = described.get("download")
    shares = described.get("load", {})
    load = Load(
        connection_share=float(shares.get("connection_share", 1.0)),
        heavy_share=float(shares.get("heavy_share", 1.0)),
        admission_wait=float(described.get("admission_wait", 0.0)),
        in_flight=int(shares.get("in_flight", 1)),
    )
    obs = Observation.from_report(
        report, costs, download_key=download["key"] if download else None, load=load
    )
    if obs is None:
        return None
    busy = [e.get("busy_seconds") for e in entries]
    figures = load_figures(described)
    eta = described.get("eta") or {}
    readings = tuple(
        (int(b), float(raw), float(actual))
        for b, raw, actual in eta.get("readings") or ()
    )
    return replace(
        obs,
        eta_readings=readings,
        eta_group=eta.get("group") or None,
        in_flight_avg=figures["in_flight_avg"],
        weight=figures["weight"] or 1.0,
        share_seconds=figures["share_seconds"],
        download_span=figures["download_span"],
        stay_seconds=figures["stay_seconds"],
        ahead_bytes=figures["ahead_bytes"],
        stages=tuple(
            (cost, seconds if b is None else float(b))
            for (cost, seconds), b in zip(obs.stages, busy, strict=True)
        ),
    )


class EngineModel:
    """The engine's time model: loaded from ``path`` lazily and off the event loop, fed
    each object that passed, saved off the loop every ``save_every`` seconds and at close.

    ``path`` None keeps the model in memory only. A state file that cannot be written is
    said in a warning; it never fails an object.
    """

    def __init__(self, path: str | None, save_every: float = 30.0) -> None:
        self.path = path
        self.save_every = save_every
        self._model: TimeModel | None = None
        self._saved_at = time.monotonic()

    async def get(self) -> TimeModel:
        """The model (loaded on first use, in a worker thread)."""
        import anyio

        if self._model is None:
            path = self.path
            loaded = await anyio.to_thread.run_sync(TimeModel.load, path) if path else TimeModel()
            if self._model is None:  # another object may have loaded it meanwhile
                self._model = loaded
        return self._model

    async def predict(
        self,
        stages: Sequence[Any],
        info: Any,
        *,
        download_key: str | None,
        early_file_stages: bool = True,
        load: Load | None = None,
    ) -> Prediction:
        """The prediction for one object after HEAD (``info``), before its first byte."""
        model = await self.get()
        costs = stage_costs(stages, info, early_file_stages=early_file_stages)
        return model.predict(int(info.size), costs, download_key=download_key, load=load)

    async def learn(self, report: Any) -> None:
        """Learn from a finished object's report (nothing unless it passed and carries the
        prediction it was made with). A failure to learn is a warning, never an error."""
        try:
            obs = observation_from_described(report)
            if obs is None:
                return
            model = await self.get()
            model.learn(obs)
        except Exception:  # noqa: BLE001 - the model must never fail an object
            logger.warning("%s: not learned by the time model", report.source, exc_info=True)
            return
        if time.monotonic() - self._saved_at >= self.save_every:
            await self.save()

    async def save(self) -> None:
        """Write the state file if anything changed (off the loop; a failure is a warning)."""
        model, path = self._model, self.path
        self._saved_at = time.monotonic()
        if model is None or not path:
            return
        import anyio

        try:
            await anyio.to_thread.run_sync(partial(model.save, path, only_if_changed=True))
        except OSError as exc:
            logger.warning("time model not saved to %s: %s", path, exc)
