"""The control plane's start-up: a plain botocore client, built without a collector pass.

Each check runs a real ``fastpipe.run`` against the SeaweedFS fixture in a fresh process,
since what it guards (which modules load, the collector's state) is per process.
"""

from __future__ import annotations

import os
from typing import Any

from freshpy import run_fresh


def _run_in_fresh_process(uri: str, before: str, after: str) -> list[str]:
    """Run ``fastpipe.run(uri)`` (checksum stage, botocore's control plane) between two
    snippets; return stdout lines."""
    code = (
        "import sys, gc, fastpipe\n"
        "from fastpipe.stages import Checksum\n"
        f"{before}\n"
        "config = fastpipe.Config(control_plane='botocore')\n"
        f"report = fastpipe.run({uri!r}, [Checksum()], config=config)\n"
        "assert report.passed, report.error\n"
        f"{after}\n"
    )
    stdout = run_fresh(code)
    return stdout.splitlines()


def test_s3_run_loads_no_aiohttp(put_object: Any) -> None:
    """HEAD and presigning go through botocore's own client: aiobotocore and aiohttp
    (about 0.1 s of imports and client set-up) load only for the fallback data plane."""
    uri = put_object(os.urandom(64 << 10))
    lines = _run_in_fresh_process(
        uri,
        "",
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'aiobotocore')))\n"
        "print('botocore' in sys.modules)",
    )
    assert lines[-2:] == ["[]", "True"]


def test_client_creation_leaves_the_collector_as_found(put_object: Any) -> None:
    """The collector is paused while the client is built, and left as it was: enabled when
    it was enabled, disabled when the caller had disabled it."""
    uri = put_object(os.urandom(4096))
    assert _run_in_fresh_process(uri, "", "print(gc.isenabled())")[-1] == "True"
    assert _run_in_fresh_process(uri, "gc.disable()", "print(gc.isenabled())")[-1] == "False"


def test_fallback_data_client_reads_botocores_models_off_the_event_loop(
    put_object: Any,
) -> None:
    """The aiobotocore client of data_plane='botocore' is made on the loop, but aiobotocore
    and aiohttp were imported, and the JSON models the client reads loaded, in a worker
    thread first: the loop's thread does neither (before, some 0.3 s of it ran there)."""
    uri = put_object(os.urandom(64 << 10))
    code = (
        "import sys, threading, botocore.loaders, fastpipe\n"
        "from fastpipe.stages import Checksum\n"
        "read_on_main = []\n"
        "load_file = botocore.loaders.JSONFileLoader.load_file\n"
        "def spy(self, path):\n"
        "    data = load_file(self, path)\n"
        "    if data is not None and threading.current_thread() is threading.main_thread():\n"
        "        read_on_main.append(path)  # a model read, not a look for an optional one\n"
        "    return data\n"
        "botocore.loaders.JSONFileLoader.load_file = spy\n"
        "import builtins\n"
        "real_import = builtins.__import__\n"
        "def first_import(name, *args, **kwargs):\n"
        "    fresh = name.split('.')[0] in ('aiohttp', 'aiobotocore') and name not in sys.modules\n"
        "    if fresh and threading.current_thread() is threading.main_thread():\n"
        "        read_on_main.append(name)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = first_import\n"
        "config = fastpipe.Config(data_plane='botocore')\n"
        f"report = fastpipe.run({uri!r}, [Checksum()], config=config)\n"
        "assert report.passed, report.error\n"
        "assert report.download.plane == 'botocore', report.download.plane\n"
        "print(read_on_main)\n"
    )
    stdout = run_fresh(code)
    assert stdout.splitlines()[-1] == "[]"
