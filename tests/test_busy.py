"""monai_segdiff.busy: the marker interactive work holds and background work waits on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from monai_segdiff.busy import BusyMarker, lower_priority


def test_hold_marks_busy_until_the_block_ends(tmp_path):
    marker = BusyMarker("/studies/model.pt", folder=tmp_path)
    assert not marker.is_busy()
    with marker.hold() as path:
        assert path.is_file() and marker.is_busy()
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with marker.hold():  # a second holder (another request) keeps it busy after the first ends
            assert len(marker.holders()) == 2
        assert marker.is_busy()
    assert not marker.is_busy() and not list(tmp_path.iterdir())


def test_marker_cleared_on_exception(tmp_path):
    marker = BusyMarker("k", folder=tmp_path)
    with pytest.raises(RuntimeError):
        with marker.hold():
            raise RuntimeError("infer failed")
    assert not marker.is_busy()


def test_keys_are_independent(tmp_path):
    a, b = BusyMarker("/a/model.pt", folder=tmp_path), BusyMarker("/b/model.pt", folder=tmp_path)
    with a.hold():
        assert a.is_busy() and not b.is_busy()


def test_stale_markers_are_ignored_and_removed(tmp_path):
    """A crashed infer's marker: too old, or its process gone."""
    marker = BusyMarker("k", folder=tmp_path, stale_after=60.0)
    old = tmp_path / f"{marker.prefix}-{os.getpid()}-old.busy"
    old.write_text("{}")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert not marker.is_busy() and not old.exists()
    if os.name == "posix":
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()  # a pid that existed and is gone
        dead = tmp_path / f"{marker.prefix}-{proc.pid}-dead.busy"
        dead.write_text("{}")
        assert not marker.is_busy() and not dead.exists()
    stray = tmp_path / f"{marker.prefix}-notapid-x.busy"  # not one of ours: ignored, left alone
    stray.write_text("{}")
    assert not marker.is_busy() and stray.exists()


def test_wait_until_idle(tmp_path):
    marker = BusyMarker("k", folder=tmp_path)
    assert marker.wait_until_idle(sleep=lambda s: pytest.fail("must not sleep when idle")) == 0.0
    now = [0.0]

    def clock():
        return now[0]

    with marker.hold() as path:
        calls = []

        def sleep(seconds):  # the holder finishes while the waiter sleeps the second time
            calls.append(seconds)
            now[0] += seconds
            if len(calls) == 2:
                path.unlink()

        waited = marker.wait_until_idle(poll=0.25, sleep=sleep, clock=clock)
        assert calls == [0.25, 0.25] and waited == pytest.approx(0.5)
    with marker.hold():  # gives up after the timeout
        now[0] = 0.0
        waited = marker.wait_until_idle(poll=1.0, timeout=3.0, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=clock)
        assert waited == pytest.approx(3.0) and marker.is_busy()


def test_unwritable_folder_still_runs_the_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    marker = BusyMarker("k", folder=blocker / "sub")  # cannot be created: a file is in the way
    with marker.hold() as path:
        assert path is None
    assert not marker.is_busy()


def test_lower_priority_in_a_process_of_its_own():
    """Nice 19 and one torch thread (in a child: it cannot be undone in this process)."""
    code = (
        "import os, json, torch\n"
        "from monai_segdiff.busy import lower_priority\n"
        "torch.set_num_threads(2)\n"
        "r = lower_priority()\n"
        "print(json.dumps({**r, 'now': os.nice(0) if hasattr(os, 'nice') else None}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["threads"] == 1
    if hasattr(os, "nice"):
        assert result["nice"] == result["now"] == 19
    assert callable(lower_priority)
