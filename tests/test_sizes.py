"""Sizes as users write them: decimal and binary units, exact arithmetic."""

from __future__ import annotations

import pytest

from fastpipe import UsageError, parse_size
from fastpipe.stages import parse_spec


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8MB", 8_000_000),
        ("8mb", 8_000_000),
        ("1kB", 1000),
        ("1KB", 1000),
        ("2GB", 2 * 10**9),
        ("3TB", 3 * 10**12),
        ("8MiB", 8 << 20),
        ("1KiB", 1024),
        ("2GiB", 2 << 30),
        ("3TiB", 3 << 40),
        ("1.5GiB", 3 << 29),
        ("1.5MB", 1_500_000),
        ("0.5KiB", 512),
        (" 42 B ", 42),
        # Twenty digits: more than a float holds exactly.
        ("99999999999999999999", 99999999999999999999),
        ("12345678901234567891MB", 12345678901234567891 * 10**6),
    ],
)
def test_parse_size_is_exact(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("8M", "ambiguous"),
        ("1G", "ambiguous"),
        ("1.3B", "whole number"),
        ("1.0000000000000000001KiB", "whole number"),
        ("1e3", "not a size"),
        ("-5", "not a size"),
        ("8 parsecs", "unknown size unit"),
        ("\u0663", "not a size"),  # a non-ASCII digit
    ],
)
def test_parse_size_refuses_clearly(text: str, cause: str) -> None:
    with pytest.raises(UsageError, match=cause):
        parse_size(text)


def test_stage_sizes_use_decimal_units() -> None:
    stage = parse_spec("limits:max_size=8MB")
    assert stage.max_size == 8_000_000  # type: ignore[attr-defined]
