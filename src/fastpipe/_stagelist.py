"""What stages one object runs: the defaults, the checks, fresh lists per object.

Also what the passed stages verified, for the report's ``verified`` field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._exceptions import UsageError
from ._report import Report, Status
from .stages._base import FileStage, Stage, StreamStage

#: What ``process_many`` takes as its stages: a factory called once per object, or a
#: sequence of ``--stage`` spec strings and stage classes, built afresh for each object.
StagesPerObject = Callable[[], Sequence[Stage]] | Sequence[str | type[Stage]] | str


def stage_list(stages: Sequence[Stage] | None) -> list[Stage]:
    """The stages one object runs (the defaults when None); refuses what is not a stage."""
    result = list(default_stages() if stages is None else stages)
    for stage in result:
        if not isinstance(stage, (StreamStage, FileStage)):
            raise UsageError(f"not a stage: {stage!r} (subclass StreamStage or FileStage)")
    return result


def default_stages() -> list[Stage]:
    """The stages run when none are given: ``checksum`` (xxh3_128) and ``verify:etag=false``.

    ``verify`` compares the bytes with a checksum S3 stored (x-amz-checksum-*: a CRC or a
    SHA, cheap in the same pass); it skips the ETag, whose MD5 would cost more than the
    download. When S3 stored no checksum nothing is verified, and the report's
    ``verified`` field is None.
    """
    from .stages.checksum import Checksum
    from .stages.verify import Verify

    return [Checksum(), Verify(etag=False)]


def verified(stages: Sequence[Stage], report: Report) -> str | None:
    """What the passed stages compared the bytes with (``; `` between them), or None."""
    found = []
    for stage, stage_report in zip(stages, report.stages, strict=True):
        if stage_report.status is Status.PASSED:
            try:
                what = stage.verified(stage_report.result)
            except Exception:  # noqa: BLE001 - a user stage's hook must not lose the report
                what = None
            if what:
                found.append(f"{stage.name}: {what}")
    return "; ".join(found) or None


def stage_factory(
    stages: StagesPerObject | None, caller: str = "process_many"
) -> Callable[[], list[Stage]] | None:
    """A function that builds a fresh stage list for one object (see ``process_many``);
    ``caller`` names the API in the usage errors (``process_many``, ``Worker``)."""
    if stages is None:
        return None
    if callable(stages) and not isinstance(stages, type):
        factory = stages
        return lambda: list(factory())
    items: list[Any] = [stages] if isinstance(stages, (str, type)) else list(stages)
    for item in items:
        if isinstance(item, Stage):
            raise UsageError(
                f"{caller} got a stage instance ({item.name}); stages keep per-object "
                "state, so it needs a factory (stages=lambda: [Checksum(), ...]), spec "
                "strings ('checksum:algo=sha256') or stage classes"
            )
        if not isinstance(item, str) and not (isinstance(item, type) and issubclass(item, Stage)):
            raise UsageError(
                f"not a stage spec or stage class: {item!r} ({caller} takes a factory, "
                "spec strings or stage classes)"
            )

    def build() -> list[Stage]:
        from .stages import parse_spec

        return [parse_spec(item) if isinstance(item, str) else item() for item in items]

    build()  # a bad spec is a usage error before the first object, not one per object
    return build
