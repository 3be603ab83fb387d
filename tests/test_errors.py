"""Bad input through the CLI: one clear line on stderr and the documented exit code.

Exit codes (fastpipe.cli): 2 usage or destination, 3 source missing / denied /
unreachable, 4 integrity, 5 local I/O. Also: keys as local file names never leave the
destination folder, and no secret or signature ever reaches the output.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import unicodedata
from typing import Any

import pytest

import fastpipe
import fastpipe.cli
from fastpipe import Config
from fastpipe._file import TempFile
from fastpipe._placement import TEMP_SUFFIX, local_name_for_key, new_temp_file, resolve_dest
from fastpipe.tools.locals3 import DEFAULT_SECRET_KEY, free_ports

REPO_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
LEAK_MARKERS = [
    "X-Amz-Signature",
    "X-Amz-Credential",
    "Signature=",
    DEFAULT_SECRET_KEY,
    "denied-secret",
]


def cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        code = fastpipe.cli.main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    for marker in LEAK_MARKERS:
        assert marker not in out and marker not in err, f"{marker!r} leaked"
    return code, out, err


def error_line(err: str) -> str:
    """The one ``fastpipe: error:`` line of stderr (argparse also prints its usage)."""
    lines = [line for line in err.splitlines() if line.startswith("fastpipe: error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- usage ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("s3:/x", "expected s3://bucket/key"),
        ("s3://", "no bucket"),
        ("s3://bucket", "no key"),
        ("s3://bucket/", "no key"),
        ("gs://bucket/key", "unsupported source scheme"),
    ],
)
def test_malformed_uri(capsys: Any, tmp_path: Any, source: str, why: str) -> None:
    code, out, err = cli(capsys, "run", source, "--dest", str(tmp_path))
    assert code == 2
    assert why in error_line(err)
    assert out == ""


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--part-size", "0"], "--part-size"),
        (["--part-size", "abc"], "--part-size"),
        (["--part-size", "-5"], "--part-size"),
        (["--concurrency", "0"], "--concurrency"),
        (["--concurrency", "two"], "--concurrency"),
        (["--max-attempts", "0"], "--max-attempts"),
    ],
)
def test_bad_sizes_and_counts(capsys: Any, bucket: str, args: list[str], why: str) -> None:
    code, _, err = cli(capsys, "run", f"s3://{bucket}/k", *args)
    assert code == 2
    assert why in error_line(err)


# -- source errors ----------------------------------------------------------------------


def test_missing_bucket(capsys: Any, s3_server: Any) -> None:
    code, _, err = cli(capsys, "run", "s3://no-such-bucket-xyz/key", "--no-progress")
    assert code == 3
    assert "no-such-bucket-xyz" in error_line(err)


def test_missing_key(capsys: Any, bucket: str) -> None:
    code, out, err = cli(capsys, "run", f"s3://{bucket}/missing/key.bin", "--json")
    assert code == 3
    assert "missing/key.bin" in error_line(err)
    assert json.loads(out)["error_type"] == "ObjectNotFound"


@pytest.mark.parametrize("as_json", [False, True])
def test_access_denied(
    capsys: Any, monkeypatch: Any, put_object: Any, tmp_path: Any, as_json: bool
) -> None:
    uri = put_object(b"secret content")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "reader-denied")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "denied-secret")
    argv = ["run", uri, "--dest", str(tmp_path)] + (["--json"] if as_json else [])
    code, out, err = cli(capsys, *argv)
    assert code == 3
    line = error_line(err)
    assert "access denied" in line and uri in line
    if as_json:
        assert json.loads(out)["error_type"] == "AccessDenied"
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(120)
def test_unreachable_endpoint(capsys: Any, s3_server: Any) -> None:
    (port,) = free_ports(1)  # closed right after: nothing listens there
    code, _, err = cli(
        capsys, "run", "s3://bucket-x/key", "--endpoint-url", f"http://127.0.0.1:{port}"
    )
    assert code == 3
    assert "unreachable" in error_line(err)


# -- destination ------------------------------------------------------------------------


def test_dest_folder_missing(capsys: Any, put_object: Any, tmp_path: Any) -> None:
    code, _, err = cli(capsys, "run", put_object(b"x"), "--dest", str(tmp_path / "no" / "f"))
    assert code == 2
    assert "does not exist" in error_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses file permissions")
def test_dest_folder_not_writable(capsys: Any, put_object: Any, tmp_path: Any) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    try:
        code, _, err = cli(capsys, "run", put_object(b"x"), "--dest", str(folder))
    finally:
        folder.chmod(0o700)
    assert code == 2
    assert "not writable" in error_line(err)


def test_dest_exists_needs_force(capsys: Any, put_object: Any, tmp_path: Any) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    uri = put_object(b"new bytes")
    code, _, err = cli(capsys, "run", uri, "--dest", str(dest))
    assert code == 2
    assert "already exists" in error_line(err) and "--force" in err
    assert dest.read_bytes() == b"old"
    code, _, _ = cli(capsys, "run", uri, "--dest", str(dest), "--force")
    assert code == 0
    assert dest.read_bytes() == b"new bytes"
    assert os.listdir(tmp_path) == ["out.bin"]


# -- local I/O --------------------------------------------------------------------------


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_file_size_limit_exit_5(put_object: Any, tmp_path: Any) -> None:
    """A process that may not write a file that large: exit 5, nothing left behind."""
    uri = put_object(os.urandom(4 << 20))
    env = dict(os.environ, PYTHONPATH=REPO_SRC, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "run", uri, "--dest", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size,
    )
    assert proc.returncode == 5, proc.stderr
    assert error_line(proc.stderr)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("plane", ["raw", "botocore"])
def test_disk_full_mid_download(
    monkeypatch: Any, put_object: Any, tmp_path: Any, plane: str
) -> None:
    """pwrite fails after some bytes (ENOSPC): LocalIOError at once, no retry, no file."""
    uri = put_object(os.urandom(2 << 20))
    real_pwrite = TempFile.pwrite
    written = [0]

    def pwrite(self: TempFile, data: memoryview, offset: int) -> None:
        if written[0] >= 512 * 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        real_pwrite(self, data, offset)

    monkeypatch.setattr(TempFile, "pwrite", pwrite)
    with pytest.raises(fastpipe.LocalIOError, match="No space left") as info:
        fastpipe.run(uri, dest=tmp_path, config=Config(part_size=256 * 1024, data_plane=plane))
    assert info.value.exit_code == 5
    assert info.value.report.download.retries == 0  # type: ignore[attr-defined]
    assert os.listdir(tmp_path) == []


# -- zero bytes -------------------------------------------------------------------------


def test_zero_byte_object(capsys: Any, put_object: Any, tmp_path: Any) -> None:
    uri = put_object(b"", key="empty/zero.bin")
    code, out, _ = cli(capsys, "run", uri, "--dest", str(tmp_path), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["passed"] and report["size"] == 0
    assert (tmp_path / "zero.bin").read_bytes() == b""
    assert os.listdir(tmp_path) == ["zero.bin"]


# -- keys as local names ----------------------------------------------------------------

NASTY_KEYS = [
    "../../etc/passwd",
    "/abs/key",
    "a/b/../../c",
    "..",
    ".",
    "",
    "dir/",
    "dir/..",
    "..\\..\\windows\\win.ini",
    "nul\x00byte",
    "\x00",
    "ctrl\x01\x1f\x7fchars",
    "tab\tand\nnewline",
    ".hidden",
    "x" * 300,
    "日本" * 60,  # 360 bytes of UTF-8
    "é" * 200,
    "a/" + "b" * 255,
    "name" + TEMP_SUFFIX,
    "e\u0301",  # decomposed: normalised to one character
]


@pytest.mark.parametrize("key", NASTY_KEYS, ids=lambda k: repr(k)[:30])
def test_local_name_for_key_stays_inside(tmp_path: Any, key: str) -> None:
    name = local_name_for_key(key)
    assert name not in ("", ".", "..")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not any(ord(c) < 32 or ord(c) == 127 for c in name)
    assert not name.startswith(".")
    assert len((name + TEMP_SUFFIX).encode("utf-8")) <= 255
    assert unicodedata.is_normalized("NFC", name)
    path = resolve_dest(tmp_path, key, force=False)
    assert os.path.dirname(path) == str(tmp_path)
    # The file system accepts the name, and the temp name beside it.
    open(path, "wb").close()  # noqa: SIM115
    tmp = new_temp_file(str(tmp_path), 0)
    tmp.remove()
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_long_keys_stay_distinct() -> None:
    a, b = local_name_for_key("x" * 300 + "a"), local_name_for_key("x" * 300 + "b")
    assert a != b


@pytest.mark.parametrize(
    "key",
    ["/abs/key", "ctrl\x01chars", "tab\tand\nnewline", "deep/dir/" + "日" * 80, ".hidden"],
    ids=lambda k: repr(k)[:20],
)
def test_downloaded_key_lands_inside_folder(
    s3_client: Any, bucket: str, tmp_path: Any, key: str
) -> None:
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"payload")
    stored = key.lstrip("/")  # SeaweedFS drops the leading slash
    report = fastpipe.run(f"s3://{bucket}/{stored}", stages=[], dest=tmp_path)
    assert report.passed
    (entry,) = os.listdir(tmp_path)
    assert entry == local_name_for_key(stored)
    assert os.path.dirname(os.path.realpath(report.dest)) == os.path.realpath(tmp_path)  # type: ignore[arg-type]
    assert (tmp_path / entry).read_bytes() == b"payload"


# -- no secrets in output ---------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
def test_no_secrets_on_success(capsys: Any, put_object: Any, tmp_path: Any, as_json: bool) -> None:
    uri = put_object(os.urandom(300_000))
    argv = ["run", uri, "--dest", str(tmp_path), "--part-size", "64KiB"]
    code, out, err = cli(capsys, *argv, *(["--json"] if as_json else []))
    assert code == 0
    assert "X-Amz" not in out + err and "Signature" not in out + err
