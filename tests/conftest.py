"""Shared fixtures: a tiny trained checkpoint, a temporary studies folder, a real MONAI Label server."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PHANTOMS = REPO / "sample-data" / "phantoms"
APP = REPO / "apps" / "segdiff"


def app_module(name: str):
    """Import ``name`` (e.g. ``lib.configs.segdiff``) from the app, as MONAI Label does: with the app's
    folder on ``sys.path`` only while importing."""
    sys.path.insert(0, str(APP))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(APP))


REPORTS: dict[str, dict] = {}  # numbers tests measured, printed after the run (pytest_terminal_summary)


def reported(title: str) -> dict:
    """A dict of measured numbers that the end of the test run prints under ``title`` (timings of the
    end-to-end journeys, reliability numbers for docs/): measured by real tests, asserted nowhere."""
    return REPORTS.setdefault(title, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, numbers in REPORTS.items():
        if numbers:
            terminalreporter.write_sep("-", title)
            terminalreporter.write_line(json.dumps(numbers, indent=1, default=str))
    out = os.environ.get("SEGDIFF_E2E_TIMINGS")
    if out and any(REPORTS.values()):
        Path(out).write_text(json.dumps(REPORTS, indent=2, default=str))


def pytest_collection_modifyitems(config, items):
    """Every end-to-end test (a real server) is slow too: ``pytest -m "not slow"`` is the quick tier."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: starts a real MONAI Label server (slow, ~2-3 minutes)")
    config.addinivalue_line("markers", "slow: over ~20 s on 2 cores; `pytest -m 'not slow'` is the quick tier")


def tiny_config(**changes):
    """The smallest useful model: a 3-level concat denoiser on 64x64 slices, 3 members x 2 steps."""
    from monai_segdiff.config import SegDiffConfig

    kw = dict(
        labels=["organ", "lesion"], network="concat", channels=[16, 16, 32], norm_num_groups=8,
        attention_levels=[False] * 3, spacing=[-1, -1, -1], roi_size=[64, 64], sample_steps=2, num_samples=3,
    )
    kw.update(changes)
    return SegDiffConfig(**kw)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A deliberately under-trained tiny checkpoint (2 iterations, ~5 s on 2 cores): a real model
    file for the server, which a short fine-tune is expected to beat (so the trainer publishes)."""
    import torch

    from monai_segdiff import data
    from monai_segdiff.training import train

    out = tmp_path_factory.mktemp("model") / "segdiff.pt"
    items = data.labelled(data.datalist(PHANTOMS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_config(), items[:6], items[6:8], output=out, epochs=1, iterations_per_epoch=2, batch_size=8)
    finally:
        torch.set_num_threads(threads)
    assert out.is_file()
    return out


def labelled_phantoms(dest: Path, count: int) -> Path:
    """A studies folder at ``dest`` with the first ``count`` phantoms, their final labels and
    ``labels.json``."""
    (dest / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = f"phantom_{i:03d}.nii.gz"
        shutil.copy(PHANTOMS / name, dest / name)
        shutil.copy(PHANTOMS / "labels" / "final" / name, dest / "labels" / "final" / name)
    shutil.copy(PHANTOMS / "labels.json", dest / "labels.json")
    return dest


def make_studies(dest: Path, unlabeled: int = 8) -> tuple[Path, list[str]]:
    """Copy the phantoms (images, ``labels/final``, ``labels.json``) to ``dest`` and delete the final
    labels of the last ``unlabeled`` images. Returns ``(dest, ids of the unlabeled images)``."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "labels" / "final").mkdir(parents=True, exist_ok=True)
    images = sorted(PHANTOMS.glob("*.nii.gz"))
    for img in images:
        shutil.copy2(img, dest / img.name)
        label = PHANTOMS / "labels" / "final" / img.name
        if label.is_file():
            shutil.copy2(label, dest / "labels" / "final" / img.name)
    shutil.copy2(PHANTOMS / "labels.json", dest / "labels.json")
    removed = []
    for img in images[-unlabeled:] if unlabeled else []:
        (dest / "labels" / "final" / img.name).unlink()
        removed.append(img.name[: -len(".nii.gz")])
    return dest, removed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``monailabel start_server`` as a subprocess in its own process group (its train/scoring
    subprocesses included), stopped by that group's id."""

    def __init__(self, studies: Path, conf: dict[str, str], log: Path, app: Path = APP):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        bindir = Path(sys.executable).parent
        script = bindir / "monailabel"
        cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "monailabel.main"]
        cmd += ["start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1",
                "--port", str(self.port)]
        for k, v in conf.items():
            cmd += ["--conf", k, str(v)]
        env = dict(os.environ)
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"  # the script runs `python -m monailabel.main`
        env.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: one per process
        env["MONAI_LABEL_SESSION_PATH"] = str(log.parent / "sessions")
        self.cmd = cmd
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=str(log.parent))
        self.started = time.time()

    def wait_ready(self, timeout: float = 180.0) -> float:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return time.time() - self.started
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        try:  # background train/scoring subprocesses of the group that outlived the server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log_file.close()


@pytest.fixture(scope="session")
def start_server():
    """Factory: ``start_server(studies, conf, log) -> Server`` (ready); every server is stopped at the end."""
    servers: list[Server] = []

    def start(studies: Path, conf: dict[str, str], log: Path, timeout: float = 180.0) -> Server:
        server = Server(studies, conf, log)
        servers.append(server)
        server.ready_seconds = server.wait_ready(timeout)
        return server

    yield start
    for server in servers:
        server.stop()


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    """Poll ``predicate()`` until it returns a truthy value; return it, or fail after ``timeout``."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


TASK_ACTIVE = ("SUBMITTED", "RUNNING")  # MONAI Label task states before DONE / ERROR / STOPPED


def wait_task_done(status, timeout: float, interval: float = 1.0, what: str = "task") -> dict:
    """Poll ``status()`` (a MONAI Label task status: train, scoring) until it leaves ``TASK_ACTIVE``;
    return that final status."""
    return wait_for(lambda: (s := status()) and s.get("status") not in TASK_ACTIVE and s,
                    timeout=timeout, interval=interval, what=what)


def task_idle(url: str, task: str) -> bool:
    """A MONAI Label task (``train``, ``scoring``) is idle: never started (404) or not in ``TASK_ACTIVE``."""
    import requests

    r = requests.get(f"{url}/{task}/", timeout=60)
    return r.status_code == 404 or r.json().get("status") not in TASK_ACTIVE


def slicer_params(info: dict, section: str, name: str) -> dict:
    """What the Slicer plugin sends: every config value, lists reduced to their first entry."""
    key = {"infer": "models", "train": "trainers", "activelearning": "strategies"}[section]
    cfg = info[key][name].get("config", {})
    return {k: (v[0] if isinstance(v, list) else v) for k, v in cfg.items()}


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (2 shared cores: two threads were ~10x slower there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def strict_json(path: Path) -> dict:
    """Parse a report file, failing on NaN / Infinity (not standard JSON)."""

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name} in {path}")

    return json.loads(path.read_text(), parse_constant=no_constants)
