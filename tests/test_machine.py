"""What the benches record about the machine: free page reporting read from a sysfs tree."""

from __future__ import annotations

import json
from pathlib import Path

from fastpipe.tools.machine import FreePageReporting, free_page_reporting, machine_info


def _device(root: Path, name: str, device: str, features: str, bound: bool = True) -> None:
    path = root / "bus" / "virtio" / "devices" / name
    path.mkdir(parents=True)
    (path / "device").write_text(device + "\n")
    (path / "features").write_text(features + "\n")
    if bound:
        (path / "driver").mkdir()


def _params(root: Path, **values: str) -> None:
    path = root / "module" / "page_reporting" / "parameters"
    path.mkdir(parents=True)
    for name, value in values.items():
        (path / name).write_text(value + "\n")


# Bits 0, 1, 5 and 7 set: what this VM's balloon negotiated.
REPORTING = "01100101" + "0" * 56
NO_REPORTING = "01100001" + "0" * 56


def test_a_bound_balloon_with_reporting_is_active(tmp_path: Path) -> None:
    _device(tmp_path, "virtio0", "0x0002", REPORTING)  # a block device: not a balloon
    _device(tmp_path, "virtio1", "0x0005", REPORTING)
    _params(tmp_path, page_reporting_order="9", min_free_ms="0")
    found = free_page_reporting(str(tmp_path))
    assert found == FreePageReporting(active=True, order=9, delay_ms=0)
    note = found.note()
    assert note is not None and "0 ms" in note and "free page reporting" in note
    assert found.describe() == {"active": True, "order": 9, "delay_ms": 0}


def test_the_mainline_kernel_has_no_delay_setting(tmp_path: Path) -> None:
    _device(tmp_path, "virtio0", "0x0005", REPORTING)
    _params(tmp_path, page_reporting_order="9")
    found = free_page_reporting(str(tmp_path))
    assert found == FreePageReporting(active=True, order=9, delay_ms=None)
    assert "about 2 s" in (found.note() or "")


def test_not_active_without_the_feature_a_driver_or_a_balloon(tmp_path: Path) -> None:
    _device(tmp_path, "virtio0", "0x0005", NO_REPORTING)  # the feature bit is clear
    _device(tmp_path, "virtio1", "0x0005", REPORTING, bound=False)  # no driver bound
    _device(tmp_path, "virtio2", "0x0001", REPORTING)  # a network device
    _device(tmp_path, "virtio3", "0x0005", "0110")  # too short to hold bit 5
    _device(tmp_path, "virtio4", "not hex", REPORTING)
    found = free_page_reporting(str(tmp_path))
    assert found == FreePageReporting(active=False)
    assert found.note() is None


def test_nothing_to_read_is_not_active(tmp_path: Path) -> None:
    assert free_page_reporting(str(tmp_path / "missing")) == FreePageReporting(active=False)
    _params(tmp_path, page_reporting_order="x", min_free_ms="")
    assert free_page_reporting(str(tmp_path)) == FreePageReporting(active=False)


def test_machine_info_is_json_ready_and_holds_it() -> None:
    info = json.loads(json.dumps(machine_info()))
    assert set(info["free_page_reporting"]) == {"active", "order", "delay_ms"}
    assert info["cpu_count"] >= 1
    # What the caller already read goes in as it is, and the record gives the note back.
    read = FreePageReporting(active=True, order=9, delay_ms=0)
    recorded = machine_info(read)["free_page_reporting"]
    assert FreePageReporting(**recorded) == read
    assert FreePageReporting(**recorded).note() == read.note()


def test_the_freepages_diagnostic_times_each_write(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "benches" / "freepages.py"
    args = ["--size", "2MiB", "--gaps", "0,0.01", "--rounds", "2", "--dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    assert lines[0].startswith("free page reporting: {")
    assert [line.split(":")[0] for line in lines[1:]] == ["gap 0 s", "gap 0.01 s"]
    assert all(len(line.split(":")[1].split()) == 2 for line in lines[1:])
    assert list(tmp_path.iterdir()) == []  # every file it wrote is gone
