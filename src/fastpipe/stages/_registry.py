"""Built-in stage registry and ``--stage`` spec parsing (``name:key=value,key=value``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._config import parse_size
from .._exceptions import UsageError
from ._base import Stage


@dataclass(frozen=True)
class Option:
    """One option of a built-in stage as the CLI sees it."""

    convert: Callable[[str], Any]
    help: str


def to_bool(text: str) -> bool:
    """Parse true/false, yes/no, 1/0, on/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def to_size(text: str) -> int:
    """Parse a size (``64KiB``, ``1MiB``, bytes)."""
    return parse_size(text)


_REGISTRY: dict[str, tuple[type[Stage], dict[str, Option], str]] = {}


def register(name: str, options: dict[str, Option], summary: str) -> Callable[[type], type]:
    """Class decorator: make a stage class available to ``--stage name:...`` specs.

    The class is built with ``cls(**converted_options)``.
    """

    def decorate(cls: type) -> type:
        _REGISTRY[name] = (cls, options, summary)
        return cls

    return decorate


def builtin_stages() -> dict[str, tuple[type[Stage], dict[str, Option], str]]:
    """Name -> (class, options, one-line summary) for every built-in stage."""
    return dict(_REGISTRY)


def _split_options(text: str) -> list[str]:
    """Split ``a=1,b="x, y"`` at commas outside double quotes."""
    parts, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise UsageError(f"unbalanced quote in stage options: {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def parse_spec(spec: str) -> Stage:
    """Build a stage from ``name`` or ``name:key=value,key=value``.

    Values may be double-quoted to hold commas. Unknown names or options, and values that
    do not convert, are a :class:`UsageError` that names them and lists what is accepted.
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UsageError(f"unknown stage {name!r} in {spec!r}; built-in stages: {known}")
    cls, own_options, _ = _REGISTRY[name]
    options = dict(COMMON_OPTIONS, **own_options)
    kwargs = _parse_options(spec, name, rest, options)
    _check_required(name, cls, options, kwargs)
    # `timeout` is every stage's (Stage.timeout) unless the stage defines its own.
    timeout = (
        kwargs.pop("timeout") if "timeout" in kwargs and "timeout" not in own_options else None
    )
    try:
        stage = cls(**kwargs)
    except UsageError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad options for stage {name!r}: {exc}") from None
    if timeout is not None:
        stage.timeout = timeout
    return stage


def _parse_options(spec: str, name: str, rest: str, options: dict[str, Option]) -> dict[str, Any]:
    """The ``key=value`` options of ``spec``, converted (a UsageError names a bad one)."""
    kwargs: dict[str, Any] = {}
    for item in _split_options(rest):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise UsageError(f"stage option {item!r} in {spec!r} is not key=value")
        if key not in options:
            accepted = ", ".join(sorted(options))
            raise UsageError(f"unknown option {key!r} for stage {name!r}; accepted: {accepted}")
        if key in kwargs:
            raise UsageError(f"option {key!r} given twice for stage {name!r} in {spec!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        try:
            kwargs[key] = options[key].convert(value)
        except (ValueError, UsageError) as exc:
            raise UsageError(f"bad value for {name}:{key}: {exc}") from None
    return kwargs


def _check_required(
    name: str, cls: type[Stage], options: dict[str, Option], kwargs: dict[str, Any]
) -> None:
    """Refuse a spec that lacks an option the stage's constructor requires."""
    missing = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in kwargs
    ]
    if missing:
        needed = "; ".join(f"{key}: {options[key].help}" for key in missing if key in options)
        raise UsageError(
            f"stage {name!r} needs option {', '.join(missing)} "
            f"(e.g. {name}:{missing[0]}=...){'; ' + needed if needed else ''}"
        )


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be a positive number of seconds: {text!r}")
    return value


#: Options every built-in stage takes besides its own.
COMMON_OPTIONS: dict[str, Option] = {
    "timeout": Option(_seconds, "seconds the stage may take in all; past that it fails"),
}
