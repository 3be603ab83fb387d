"""The end-to-end time of an object from its size: a linear fit of `fastpipe bench` runs.

The bench reports it; neither the engine nor ``fastpipe estimate`` reads it (they use the
time model, :mod:`fastpipe._model`): the library's behaviour never depends on a benchmark
left in the user's cache.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GiB = 1 << 30


@dataclass(frozen=True)
class Fit:
    """``seconds = intercept + per_gib * size_in_GiB``, least squares over every run."""

    per_gib: float
    intercept: float
    r2: float
    points: int

    def seconds(self, size: int) -> float:
        return self.intercept + self.per_gib * size / GiB

    def describe(self) -> str:
        return (
            f"{self.per_gib:.3f} s/GiB + {self.intercept:.3f} s (R²={self.r2:.4f}, n={self.points})"
        )


def linear_fit(points: Sequence[tuple[int, float]]) -> Fit | None:
    """Fit ``(size_bytes, seconds)`` points; None with fewer than two distinct sizes."""
    if len({size for size, _ in points}) < 2:
        return None
    xs = [size / GiB for size, _ in points]
    ys = [seconds for _, seconds in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(per_gib=b, intercept=a, r2=r2, points=len(xs))


def fits(runs: Sequence[dict[str, Any]]) -> dict[str, Fit]:
    """One fit per variant over its runs on random objects."""
    out: dict[str, Fit] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        pts = [
            (r["size"], r["seconds"])
            for r in runs
            if r["variant"] == variant
            and r.get("object", "random") == "random"
            and r.get("exit_code", 0) == 0
        ]
        fit = linear_fit(pts)
        if fit is not None:
            out[variant] = fit
    return out


def default_results_path() -> str:
    """Where ``fastpipe bench`` leaves a copy of its last results.

    ``$XDG_CACHE_HOME/fastpipe/bench/results.json`` (``~/.cache`` by default).
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastpipe", "bench", "results.json")


def load_results(path: str | None = None) -> dict[str, Any] | None:
    """The results file at ``path`` (default: :func:`default_results_path`), or None."""
    path = path or default_results_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("runs"), list) else None


def estimate_seconds(size: int, results_path: str | None = None) -> float | None:
    """Predicted end-to-end seconds of checksum + scan + chunk on an object of ``size`` bytes.

    From the linear fit of the ``fastpipe`` variant in the last ``fastpipe bench`` results
    (``results_path``, default :func:`default_results_path`); None when there are none, or
    fewer than two sizes. Never below zero.
    """
    data = load_results(results_path)
    fit = fits(data["runs"]).get("fastpipe") if data else None
    return None if fit is None else max(0.0, fit.seconds(size))
