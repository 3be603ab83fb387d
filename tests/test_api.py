"""The public face: exports, errors, configuration, parsing. No server needed."""

from __future__ import annotations

import importlib
import os
import stat
from pathlib import Path

import pytest

import fastpipe
import fastpipe.stages
from fastpipe import Config, FastpipeError, UsageError, parse_size
from fastpipe._file import Watermark
from fastpipe._placement import new_temp_file
from fastpipe._source import LocalLocation, S3Location, parse_source


@pytest.mark.parametrize("module", ["fastpipe", "fastpipe.stages"])
def test_every_exported_name_imports(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name


def test_py_typed_ships() -> None:
    assert (Path(fastpipe.__file__).parent / "py.typed").exists()


def test_errors_form_one_hierarchy() -> None:
    errors = [
        getattr(fastpipe, name)
        for name in fastpipe.__all__
        if isinstance(getattr(fastpipe, name), type)
        and issubclass(getattr(fastpipe, name), BaseException)
    ]
    assert len(errors) >= 10
    assert all(issubclass(e, FastpipeError) for e in errors)
    assert issubclass(fastpipe.ObjectNotFound, FileNotFoundError)
    assert issubclass(fastpipe.AccessDenied, PermissionError)
    assert issubclass(fastpipe.StageTimeout, TimeoutError)
    assert issubclass(fastpipe.UsageError, ValueError)
    codes = {
        fastpipe.StageFailed: 1,
        fastpipe.UsageError: 2,
        fastpipe.DestinationError: 2,
        fastpipe.ObjectNotFound: 3,
        fastpipe.RetriesExhausted: 3,
        fastpipe.ObjectChanged: 4,
        fastpipe.LocalIOError: 5,
    }
    for cls, code in codes.items():
        assert cls.exit_code == code
    last = OSError("reset")
    assert fastpipe.RetriesExhausted("x", last).last_error is last


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8MiB", 8 << 20),
        ("512KiB", 512 << 10),
        ("1GiB", 1 << 30),
        ("4096", 4096),
        ("1.5KiB", 1536),
        ("64KB", 64_000),
        ("0", 0),
        ("7B", 7),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.3B", "8 parsecs", "1.0000001KiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"part_size": 0},
        {"max_concurrency": 0},
        {"max_attempts": 0},
        {"data_plane": "carrier-pigeon"},
        {"receive_buffer": 10},
        {"read_timeout": 0},
        {"endpoint_url": "127.0.0.1:9000"},
        {"endpoint_url": "localhost:9000"},
        {"endpoint_url": "http://"},
        {"endpoint_url": "http://user:secret@127.0.0.1:9000"},
        {"region": "bad region"},
        {"region": ""},
    ],
)
def test_config_validates_itself(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        Config(**kwargs)  # type: ignore[arg-type]


def test_endpoint_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:9000")
    with pytest.raises(UsageError, match="AWS_ENDPOINT_URL"):
        Config().resolved_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert Config().resolved_endpoint() == "http://127.0.0.1:9000"
    assert Config(region="eu-west-1", endpoint_url="https://s3.example.com").region


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.part_size = 1  # type: ignore[misc]


def test_parse_source() -> None:
    assert parse_source("s3://bucket/a/b.bin") == S3Location("bucket", "a/b.bin")
    assert parse_source("s3://bucket/k?versionId=v1") == S3Location("bucket", "k", "v1")
    assert parse_source("/tmp/x") == LocalLocation("/tmp/x")
    assert parse_source(Path("rel")) == LocalLocation("rel")
    # str() is what reports carry: absolute paths, and the version when one was given.
    assert str(parse_source("rel")) == os.path.join(os.getcwd(), "rel")
    assert str(parse_source("s3://bucket/k?versionId=v1")) == "s3://bucket/k?versionId=v1"
    assert str(parse_source("s3://bucket/k")) == "s3://bucket/k"
    for bad in ("s3:/x", "s3://", "s3://bucket", "s3://bucket/", "s3:///key", "gs://b/k", ""):
        with pytest.raises(UsageError):
            parse_source(bad)


def test_temp_file_is_private_and_removed(tmp_path: Path) -> None:
    tmp = new_temp_file(str(tmp_path), 1000)
    assert stat.S_IMODE(os.stat(tmp.path).st_mode) == 0o600
    assert os.path.getsize(tmp.path) == 1000
    tmp.pwrite(memoryview(b"abc"), 10)
    tmp.remove()
    tmp.remove()  # idempotent
    assert list(tmp_path.iterdir()) == []


def test_watermark_advances_only_over_contiguous_parts() -> None:
    wm = Watermark(size=10, part_size=4)  # parts [0,4) [4,8) [8,10)
    assert wm.parts == 3
    wm.advance(1, 4)
    assert wm.value == 0
    wm.advance(0, 3)
    assert wm.value == 3
    wm.advance(0, 1)
    assert wm.value == 8  # part 0 complete, part 1 already was
    wm.advance(2, 2)
    assert wm.value == 10
    assert wm.completed_parts() == frozenset({0, 1, 2})
    fresh = Watermark(size=10, part_size=4)
    assert fresh.preset({0, 2}) == 6 and fresh.value == 4


def test_stage_names_are_unique_and_documented() -> None:
    builtins = fastpipe.stages.builtin_stages()
    assert set(builtins) >= {"checksum", "limits", "verify", "scan", "chunk", "command"}
    for name, (cls, options, summary) in builtins.items():
        assert cls.name == name
        assert cls.__doc__ and summary
        assert all(option.help for option in options.values())


def test_console_script_exits_with_main_code(tmp_path: Path) -> None:
    """`fastpipe` (cli.entry) skips interpreter teardown but keeps output and exit code."""
    import subprocess
    import sys

    missing = tmp_path / "missing.bin"
    result = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "run", str(missing), "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3
    assert '"error_type": "ObjectNotFound"' in result.stdout
    assert "no such file" in result.stderr


def test_range_response_checks_run_before_the_body() -> None:
    """Both data planes refuse a 2xx that is not the asked range of the HEAD'ed object."""
    from fastpipe._objectinfo import ObjectInfo, PinnedObject
    from fastpipe._s3 import check_range_response

    loc = S3Location("bucket", "key")
    obj = PinnedObject(loc, ObjectInfo(source=str(loc), size=100, etag="abc"))

    def check(**kw: object) -> None:
        args = dict(
            status=206, content_length=10, content_range="bytes 10-19/100", response_etag='"abc"'
        )
        args.update(kw)
        check_range_response(obj, 10, 20, **args)  # type: ignore[arg-type]

    check()
    with pytest.raises(fastpipe.IntegrityError, match="another range"):
        check(content_range="bytes 0-9/100")
    with pytest.raises(fastpipe.IntegrityError, match="range length"):
        check(content_length=11)
    with pytest.raises(fastpipe.ObjectChanged, match="size 100 became 200"):
        check(content_range="bytes 10-19/200")
    with pytest.raises(fastpipe.ObjectChanged, match="ETag abc became def"):
        check(response_etag='"def"')
    with pytest.raises(fastpipe.IntegrityError, match="ignored the byte range"):
        check(status=200)


def test_report_enums_are_their_strings_in_json(tmp_path: Path) -> None:
    """Status, kind and plane are str-valued enums: the JSON report holds plain strings."""
    import json

    from fastpipe.stages import Checksum

    local = tmp_path / "local.bin"
    local.write_bytes(b"x" * 1000)
    events: list[fastpipe.Progress] = []
    report = fastpipe.run(str(local), stages=[Checksum()], progress=events.append)
    assert report.stages[0].status is fastpipe.Status.PASSED
    assert report.stages[0].kind is fastpipe.Kind.STREAM
    assert report.download.plane is fastpipe.Plane.LOCAL
    assert events and all(e.phase is fastpipe.Phase.STREAM for e in events)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["download"]["plane"] == "local" and "path" not in data["download"]
    assert data["stages"][0]["status"] == "passed" and data["stages"][0]["kind"] == "stream"
    for enum in (fastpipe.Status, fastpipe.Kind, fastpipe.Phase, fastpipe.Plane):
        assert enum.__doc__
        assert all(isinstance(m, str) and str(m) == m.value for m in enum)


@pytest.mark.parametrize(("sync", "coro"), [("run", "process"), ("run_many", "process_many")])
def test_sync_entry_points_take_what_their_coroutines_take(sync: str, coro: str) -> None:
    import inspect

    fn = getattr(fastpipe, sync)
    assert fn.__name__ == sync and fn.__doc__ and fn.__doc__.startswith("Synchronous")
    assert not inspect.iscoroutinefunction(fn)
    assert inspect.signature(fn) == inspect.signature(getattr(fastpipe, coro))


def test_run_many_runs_local_files(tmp_path: Path) -> None:
    paths = []
    for name in ("a.bin", "b.bin"):
        path = tmp_path / name
        path.write_bytes(name.encode() * 1000)
        paths.append(str(path))
    reports = fastpipe.run_many(paths, force=True)
    assert sorted(r.size for r in reports) == [5000, 5000]
    assert fastpipe.run(paths[0]).size == 5000
