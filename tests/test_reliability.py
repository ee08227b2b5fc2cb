"""Reliability of the MONAI Label app against a real ``monailabel start_server`` (issue 8), in order:

1. bad input -- uploads, infer requests, labels, checkpoints, options, ids -- each answered with a
   clear 4xx and the reason in the body, nothing stored, no user label touched, the server still serving;
   input that is legitimately usable (2D, constant, partly NaN, extremely anisotropic, large) segmented;
2. load: 50 concurrent infer requests all answered, server memory bounded;
3. faults: infer during training serves the last published model; the training subprocess killed with
   SIGKILL mid-epoch leaves the model loadable and every label intact, and the next training runs;
   a server killed with SIGKILL and restarted keeps labels and uncertainty scores;
4. training refused (422) with fewer than two labelled images.

One server for the module (a tiny model, 2 samples x 1 step); results counted in docs/RELIABILITY.md.
The CLI and atomic-write side is in ``test_reliability_cli.py``, authentication in ``test_reliability_auth.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from conftest import PHANTOMS, dump, reported, make_studies, task_idle, tiny_config, wait_for, wait_task_done

from monai_segdiff.config import load_checkpoint, save_checkpoint
from monai_segdiff.networks import build_network

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SCORE, TS = "segdiff_uncertainty", "segdiff_uncertainty_ts"
RESULTS: dict[str, object] = reported("reliability numbers (tiny model, 2 shared cores; docs/RELIABILITY.md)")


# --------------------------------------------------------------------------------------------------
# the server and helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model, start_server):
    root = tmp_path_factory.mktemp("reliability")
    model = root / "model" / "segdiff.pt"
    model.parent.mkdir()
    shutil.copy(tiny_model, model)
    studies, unlabeled = make_studies(root / "studies", unlabeled=3)
    for image in sorted(studies.glob("phantom_*.nii.gz"))[6:-3]:  # 6 labelled + 3 unlabelled: quick to train
        image.unlink()
        (studies / "labels" / "final" / image.name).unlink()
    conf = {"model_path": str(model), "samples": "2", "steps": "1", "scoring_samples": "1", "scoring_steps": "1"}
    server = start_server(studies, conf, root / "server.log")
    return {"server": server, "url": server.url, "studies": studies, "model": model, "root": root,
            "unlabeled": unlabeled, "conf": conf, "start": start_server, "files": root / "files"}


def still_serving(srv) -> None:
    r = requests.get(f"{srv['url']}/info/", timeout=120)
    assert r.status_code == 200, r.text


def assert_4xx(r: requests.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail, r.text
    for word in words:
        assert word in detail, (word, detail)


def infer(srv, model: str = "segdiff", image: str = "", file: Path | None = None, params: dict | None = None,
          output: str = "json") -> requests.Response:
    files = {"file": (file.name, file.read_bytes())} if file else None
    return requests.post(f"{srv['url']}/infer/{model}", params={"image": image, "output": output},
                         data={"params": json.dumps(params or {})}, files=files, timeout=600)


def put_image(srv, path: Path, image_id: str | None = None) -> requests.Response:
    query = {"image": image_id} if image_id else {}
    return requests.put(f"{srv['url']}/datastore/image", params=query, data={"params": "{}"},
                        files={"file": (path.name, path.read_bytes())}, timeout=120)


def put_label(srv, image_id: str, path: Path, tag: str | None = None, params: dict | None = None):
    query = {"image": image_id, **({"tag": tag} if tag else {})}
    return requests.put(f"{srv['url']}/datastore/label", params=query, data={"params": json.dumps(params or {})},
                        files={"label": (path.name, path.read_bytes())}, timeout=120)


def save_nifti(srv, name: str, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    folder = srv["files"]
    folder.mkdir(exist_ok=True)
    path = folder / name
    nib.save(nib.Nifti1Image(array, phantom().affine if affine is None else affine), str(path))
    return path


def phantom(name: str = "phantom_000") -> nib.Nifti1Image:
    return nib.load(str(PHANTOMS / f"{name}.nii.gz"))


def voxels(name: str = "phantom_000") -> np.ndarray:
    return np.asarray(phantom(name).dataobj).astype(np.float32)


def truth(name: str) -> np.ndarray:
    return np.asarray(nib.load(str(PHANTOMS / "labels" / "final" / f"{name}.nii.gz")).dataobj).astype(np.uint8)


def label_digests(studies: Path) -> dict[str, str]:
    """sha256 of every label file (all tags)."""
    return {str(p.relative_to(studies)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((studies / "labels").rglob("*")) if p.is_file()}


def objects(srv) -> dict:
    r = requests.get(f"{srv['url']}/datastore/", params={"output": "all"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["objects"]


def scores_current(srv) -> dict | None:
    ts = os.stat(srv["model"]).st_mtime
    found = {i: (o["image"]["info"].get(SCORE), o["image"]["info"].get(TS))
             for i, o in objects(srv).items() if "final" not in o.get("labels", {})}
    return found if found and all(t == ts and isinstance(s, float) for s, t in found.values()) else None


def train_stats(srv) -> dict:
    try:
        return json.loads((srv["model"].parent / "train_stats.json").read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------------
# 1. bad input
# --------------------------------------------------------------------------------------------------
def test_uploads_of_bad_images_are_refused(srv):
    studies = srv["studies"]
    before = sorted(p.name for p in studies.iterdir())
    a = voxels()
    junk = srv["files"] / "notes.nii.gz"
    save_nifti(srv, "ok.nii.gz", a)
    junk.write_bytes(b"this is not an image")
    truncated = srv["files"] / "truncated.nii.gz"
    truncated.write_bytes((PHANTOMS / "phantom_000.nii.gz").read_bytes()[:20000])
    cases = [
        ("non-image", put_image(srv, junk), 422, ["cannot read image"]),
        ("truncated NIfTI", put_image(srv, truncated), 422, ["Compressed file ended"]),
        ("4D image", put_image(srv, save_nifti(srv, "four_d.nii.gz", np.stack([a] * 3, -1))), 422,
         ["3 channels or volumes", "the model takes 1"]),
        ("all NaN", put_image(srv, save_nifti(srv, "nan.nii.gz", np.full(a.shape, np.nan, np.float32))), 422,
         ["no finite voxel"]),
        ("too small", put_image(srv, save_nifti(srv, "dot.nii.gz", a[:1, :1, :2])), 422, ["too small"]),
        ("path traversal id", put_image(srv, srv["files"] / "ok.nii.gz", "../../escaped"), 400, ["invalid image id"]),
        ("hidden id", put_image(srv, srv["files"] / "ok.nii.gz", ".hidden"), 400, ["invalid image id"]),
        ("replace a labelled image", put_image(srv, srv["files"] / "ok.nii.gz", "phantom_000"), 409, ["has labels"]),
    ]
    for what, r, status, words in cases:
        assert_4xx(r, status, *words)
    assert sorted(p.name for p in studies.iterdir()) == before  # nothing stored
    assert not list(studies.parent.glob("escaped*")) and not list(studies.parent.parent.glob("escaped*"))
    stored = nib.load(str(studies / "phantom_000.nii.gz"))
    assert np.array_equal(np.asarray(phantom().dataobj), np.asarray(stored.dataobj))
    still_serving(srv)


def test_infer_refuses_unusable_images(srv):
    a = voxels()
    truncated = srv["files"] / "truncated.nii.gz"
    truncated.write_bytes((PHANTOMS / "phantom_000.nii.gz").read_bytes()[:20000])
    bomb = srv["files"] / "bomb.nii"
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4096, 4096, 4096))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    bomb.write_bytes(hdr.binaryblock + b"\0" * (4 + 1024))
    rss = psutil.Process(srv["server"].proc.pid).memory_info().rss
    cases = [
        ("truncated NIfTI", truncated, ["cannot read image", "Compressed file ended"]),
        ("4D image", save_nifti(srv, "four_d.nii.gz", np.stack([a] * 3, -1)), ["image channel", "has 3"]),
        ("all NaN / Inf", save_nifti(srv, "nan.nii.gz", np.full(a.shape, np.inf, np.float32)), ["no finite voxel"]),
        ("header of 4096^3 voxels", bomb, ["too large", "4096"]),
    ]
    for what, path, words in cases:
        assert_4xx(infer(srv, file=path), 422, *words)
    # the 64 G-voxel header was refused unread
    assert psutil.Process(srv["server"].proc.pid).memory_info().rss < rss + 200e6
    still_serving(srv)


def assert_result_on_grid(result_file: str, source: Path) -> np.ndarray:
    res, src = nib.load(result_file), nib.load(str(source))
    assert res.shape[: len(src.shape)] == src.shape, (res.shape, src.shape)
    if len(src.shape) == 2:  # a 2D image: answered as one slice with the image's in-plane geometry
        np.testing.assert_allclose(res.affine[:2, [0, 1, 3]], src.affine[:2, [0, 1, 3]], atol=1e-3)
    else:
        np.testing.assert_allclose(res.affine, src.affine, atol=1e-3)
    return np.asarray(res.dataobj)


@pytest.fixture(scope="module")
def client(srv):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(srv["url"], tmpdir=str(srv["root"]), client_id="reliability")


def test_usable_edge_images_are_segmented(srv, client):
    a = voxels()
    nan_inf = a[:, :, 12:20].copy()
    nan_inf[::7, ::5] = np.nan
    nan_inf[1::9, ::3] = np.inf
    cases = {
        "2D image": save_nifti(srv, "slice.nii.gz", a[:, :, 16]),
        "constant volume": save_nifti(srv, "constant.nii.gz", np.full((32, 32, 8), 7.0, np.float32)),
        "NaN / Inf voxels": save_nifti(srv, "nan_inf.nii.gz", nan_inf),
        "extreme anisotropic spacing (0.05 x 0.05 x 40 mm)": save_nifti(
            srv, "anisotropic.nii.gz", a[:, :, 12:20], np.diag([0.05, 0.05, 40.0, 1.0])),
        "6x the slice size (384 x 384)": save_nifti(srv, "large.nii.gz", np.tile(a[:, :, 14:15], (6, 6, 1))),
    }
    answers = {}
    for what, path in cases.items():
        result, out = client.infer("segdiff", "", {}, file=str(path))
        try:
            label = assert_result_on_grid(result, path)
        finally:
            os.unlink(result)
        assert set(np.unique(label).astype(int).tolist()) <= {0, 1, 2}, what
        assert out["label_names"] == {"background": 0, "organ": 1, "lesion": 2}
        assert out["case_score"] is None or 0.0 <= out["case_score"] <= 1.0  # finite (JSON has no NaN)
        answers[what] = {"status": 200, "foreground_voxels": int((label > 0).sum()), "shape": list(label.shape)}
    RESULTS["edge images"] = answers
    still_serving(srv)


def test_bad_infer_options_are_refused(srv):
    image = srv["unlabeled"][0]
    cases = [
        ({"samples": -1}, ["samples must be a whole number in 1..32"]),
        ({"steps": -1}, ["steps must be a whole number in 1..100"]),
        ({"samples": "many"}, ["samples"]),
        ({"samples": 10000}, ["samples"]),
        ({"steps": 2.5}, ["steps"]),
        ({"device": "tpu:7"}, ["device must be one of"]),
    ]
    for params, words in cases:
        assert_4xx(infer(srv, image=image, params=params), 422, *words)
    r = infer(srv, "segdiff_uncertainty", image=image, params={"uncertainty_threshold": 1.5})
    assert_4xx(r, 422, "uncertainty_threshold")
    # 0 is what 3D Slicer sends for "the model's default" (the config shows samples 0, steps 0)
    r = infer(srv, image=image, params={"samples": 0, "steps": 0})
    assert r.status_code == 200 and r.json()["samples"] == 2, r.text
    still_serving(srv)


def test_path_traversal_and_label_tags_are_refused(srv):
    for image in ("../../../../etc/passwd", "/etc/passwd", str(srv["studies"] / ".." / "model" / "segdiff.pt")):
        assert_4xx(infer(srv, image=image), 404, "not found in the datastore")
    image = srv["unlabeled"][0]
    before = label_digests(srv["studies"])
    r = infer(srv, image=image, params={"save_label": True, "label_tag": "final"})
    assert_4xx(r, 409, "never saved as the final label")
    assert_4xx(infer(srv, image=image, params={"save_label": True, "label_tag": "../../x"}), 400, "invalid label tag")
    assert label_digests(srv["studies"]) == before
    still_serving(srv)


def test_bad_labels_are_refused_and_the_user_label_kept(srv):
    studies, name = srv["studies"], "phantom_001"
    stored = studies / "labels" / "final" / f"{name}.nii.gz"
    before = stored.read_bytes()
    img = phantom(name)
    lab = truth(name)
    outside = lab.copy()
    outside[0, 0, 0] = 7
    shifted = img.affine.copy()
    shifted[:3, 3] += 5.0
    empty_file = srv["files"] / "empty.nii.gz"
    empty_file.write_bytes(b"")
    one_segment = {"label_info": [{"name": "organ", "idx": 1}]}  # Slicer exported one segment: values 0..1
    cases = [
        ("values outside the label set", put_label(srv, name, save_nifti(srv, "l1.nii.gz", outside, img.affine)),
         422, ["[7]", "outside the label set"]),
        ("values beyond the segments named in label_info",
         put_label(srv, name, save_nifti(srv, "l2.nii.gz", lab, img.affine), params=one_segment), 422, ["[2]"]),
        ("non-integer values", put_label(srv, name, save_nifti(srv, "l3.nii.gz", lab + np.float32(0.5), img.affine)),
         422, ["whole numbers"]),
        ("shape mismatch", put_label(srv, name, save_nifti(srv, "l4.nii.gz", lab[:40], img.affine)), 422,
         ["shape", "does not match"]),
        ("affine mismatch", put_label(srv, name, save_nifti(srv, "l5.nii.gz", lab, shifted)), 422, ["geometry"]),
        ("image does not exist", put_label(srv, "no_such_image", save_nifti(srv, "l6.nii.gz", lab, img.affine)), 404,
         ["no image 'no_such_image'"]),
        ("zero-byte file", put_label(srv, name, empty_file), 422, ["empty (0 bytes)"]),
        ("empty label over a non-empty one", put_label(srv, name, save_nifti(srv, "l7.nii.gz", 0 * lab, img.affine)),
         409, ["empty", "non-empty"]),
        ("path traversal tag", put_label(srv, name, save_nifti(srv, "l8.nii.gz", lab, img.affine), tag="../../x"),
         400, ["invalid label tag"]),
        ("path traversal image id", put_label(srv, "../phantom_001", save_nifti(srv, "l9.nii.gz", lab, img.affine)),
         400, ["invalid image id"]),
    ]
    for what, r, status, words in cases:
        assert_4xx(r, status, *words)
    assert stored.read_bytes() == before  # the user's label is untouched
    assert not [p for p in (studies / "labels").rglob("*") if p.name.startswith(".")]
    assert sorted(p.name for p in (studies / "labels").iterdir()) == ["final", "original"]

    # a valid correction replaces it; the replaced version is kept
    corrected = lab.copy()
    corrected[lab == 2] = 1
    r = put_label(srv, name, save_nifti(srv, "l10.nii.gz", corrected, img.affine))
    assert r.status_code == 200, r.text
    assert np.array_equal(np.asarray(nib.load(str(stored)).dataobj), corrected)
    assert (studies / ".segdiff" / "replaced" / "final" / f"{name}.nii.gz").read_bytes() == before
    # an empty label for an image without one is a valid answer ("nothing to segment here")
    blank = srv["unlabeled"][-1]
    r = put_label(srv, blank, save_nifti(srv, "l11.nii.gz", np.zeros(phantom(blank).shape, np.uint8),
                                         phantom(blank).affine))
    assert r.status_code == 200, r.text
    srv["unlabeled"] = srv["unlabeled"][:-1]
    still_serving(srv)


def test_bad_train_options_are_refused_before_training_starts(srv):
    cases = [
        ({"pretrained": False, "network": "nope"}, ["unknown network 'nope'"]),
        ({"max_epochs": -1}, ["max_epochs must be a number >= 0"]),
        ({"val_split": 2}, ["val_split"]),
        ({"learning_rate": 0}, ["learning_rate must be a number > 0"]),
        ({"train_batch_size": "lots"}, ["train_batch_size"]),
    ]
    for params, words in cases:
        assert_4xx(train(srv, params), 422, *words)
    assert task_idle(srv["url"], "train") and train_process(srv) is None
    still_serving(srv)


def put_model(srv, path: Path) -> None:
    """Replace the served model the MONAI Label way (``PUT /model/segdiff``)."""
    r = requests.put(f"{srv['url']}/model/segdiff", files={"file": (path.name, path.read_bytes())}, timeout=120)
    assert r.status_code == 200, r.text


def test_corrupted_checkpoint_and_other_label_set(srv, tiny_model):
    image = srv["unlabeled"][0]
    corrupted = srv["files"] / "corrupted.pt"
    corrupted.write_bytes(tiny_model.read_bytes()[:50000])
    put_model(srv, corrupted)
    try:
        r = infer(srv, image=image)
        assert_4xx(r, 503, "cannot use model file", "not a readable monai-segdiff checkpoint")
        info = requests.get(f"{srv['url']}/info/", timeout=60).json()
        assert info["labels"] == ["organ", "lesion", "background"]  # from labels.json while the model is unusable

        # a model for another label set is served with its own labels and says what it cannot segment;
        # labels are checked against the studies' label set (labels.json), not the model's
        cfg = tiny_config(labels=["liver"])
        other = save_checkpoint(srv["files"] / "liver.pt", build_network(cfg).state_dict(), cfg)
        put_model(srv, other)
        r = infer(srv, image=image)
        assert r.status_code == 200 and r.json()["label_names"] == {"background": 0, "liver": 1}, r.text
        assert r.json()["coverage"]["cannot_segment"] == ["organ", "lesion"], r.text
        info = requests.get(f"{srv['url']}/info/", timeout=60).json()
        assert info["labels"] == ["organ", "lesion", "liver", "background"] and "no model for 'organ'" in info["segdiff"]["message"]
        name = "phantom_002"
        outside = truth(name).copy()
        outside[0, 0, 0] = 3
        r = put_label(srv, name, save_nifti(srv, "l12.nii.gz", outside, phantom(name).affine))
        assert_4xx(r, 422, "[3]", "outside the label set")
    finally:
        put_model(srv, tiny_model)
    r = infer(srv, image=image)
    assert r.status_code == 200 and r.json()["label_names"] == {"background": 0, "organ": 1, "lesion": 2}, r.text
    load_checkpoint(srv["model"])


# --------------------------------------------------------------------------------------------------
# 2. load
# --------------------------------------------------------------------------------------------------
class RssSampler:
    """Resident memory of a process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.proc, self.interval, self.values = psutil.Process(pid), interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.values.append(self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def fifty_requests(srv, ids: list[str]) -> list[tuple[int, float, object]]:
    """50 concurrent infer requests (raw HTTP, one thread each): ``[(status, seconds, cached or body)]``."""

    def one(i: int):
        t = time.perf_counter()
        model = "segdiff" if i % 2 else "segdiff_uncertainty"
        try:
            r = infer(srv, model, image=ids[(i // 2) % len(ids)], params={"samples": 1 + 2 * (i % 2)})
        except requests.RequestException as e:  # no answer at all: counted as a failure below
            return -1, time.perf_counter() - t, repr(e)
        return r.status_code, time.perf_counter() - t, r.json().get("cached") if r.ok else r.text[:200]

    with ThreadPoolExecutor(50) as pool:
        return list(pool.map(one, range(50)))


def test_fifty_concurrent_infer_requests(srv):
    ids = [srv["unlabeled"][0], "phantom_003"]  # x samples 1 / 3: 4 ensembles, the size of the cache
    pid = srv["server"].proc.pid
    base = psutil.Process(pid).memory_info().rss
    info, done = [], threading.Event()

    def poll_info():  # another annotator's /info during the burst
        while not done.is_set():
            t = time.perf_counter()
            info.append((requests.get(f"{srv['url']}/info/", timeout=600).status_code, time.perf_counter() - t))
            time.sleep(0.2)

    poller = threading.Thread(target=poll_info)
    with RssSampler(pid) as first:
        t0 = time.perf_counter()
        poller.start()
        results = fifty_requests(srv, ids)
        wall = time.perf_counter() - t0
        done.set()
        poller.join()
    statuses = Counter(r[0] for r in results)
    assert set(statuses) <= {200, 429, 503}, dump(results)  # a result or a clear busy answer, never an error
    assert info and all(status == 200 for status, _ in info)
    assert statuses[200] >= 1 and Counter(str(r[2]) for r in results)["False"] == 4  # 4 ensembles computed
    with RssSampler(pid) as second:  # the same 50 again: all from the prediction cache
        again = fifty_requests(srv, ids)
    assert Counter(r[0] for r in again) == Counter({200: 50}), dump(again)
    peak = max(first.values + second.values)
    RESULTS["load"] = {
        "answers": dict(statuses), "cached": dict(Counter(str(r[2]) for r in results)),
        "wall_s": round(wall, 1), "slowest_s": round(max(r[1] for r in results), 1),
        "info_during_burst": len(info), "info_slowest_s": round(max(t for _, t in info), 1),
        "rss_before_mb": round(base / 1e6), "rss_peak_mb": round(peak / 1e6),
        "rss_after_round1_mb": round(first.values[-1] / 1e6), "rss_after_round2_mb": round(second.values[-1] / 1e6),
    }
    assert peak < base + 1.5e9, RESULTS["load"]  # bounded: a fixed prediction cache, one infer at a time
    assert second.values[-1] < first.values[-1] + 150e6, RESULTS["load"]  # no growth with repeated load
    assert psutil.Process(pid).is_running()
    still_serving(srv)


# --------------------------------------------------------------------------------------------------
# 3. faults
# --------------------------------------------------------------------------------------------------
def train_process(srv) -> psutil.Process | None:
    for p in psutil.Process(srv["server"].proc.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "monailabel.interfaces.utils.app" in cmd and "train" in cmd:
            return p
    return None


def train(srv, params: dict) -> requests.Response:
    return requests.post(f"{srv['url']}/train/segdiff_train", json=params, timeout=60)


def wait_train_done(srv, timeout: float = 300) -> dict:
    return wait_task_done(lambda: requests.get(f"{srv['url']}/train/", timeout=60).json(), timeout=timeout,
                          interval=0.5, what="training task")


def test_infer_during_training_and_sigkill_mid_epoch(srv):
    labels_before = label_digests(srv["studies"])
    served_before = os.stat(srv["model"]).st_mtime
    ids = [srv["unlabeled"][1], "phantom_004", "phantom_005"]
    params = {"pretrained": False, "network": "concat", "max_epochs": 100, "max_minutes": 0,
              "iterations_per_epoch": 3, "train_batch_size": 2, "val_split": 0.1, "tracking": "none"}
    r = train(srv, params)
    assert r.status_code == 200, r.text
    answers, i = [], 0

    def ask() -> None:
        nonlocal i
        r = infer(srv, image=ids[i % 3], params={"samples": 1 + (i // 3) % 2})
        i += 1
        answers.append((r.status_code, r.json().get("model_ts") if r.ok else r.text, os.stat(srv["model"]).st_mtime))

    def published():  # infer keeps answering while the subprocess trains
        ask()
        s = train_stats(srv)
        return s.get("status") == "RUNNING" and s.get("published") and s.get("epoch", 0) >= 1 and s

    stats = wait_for(published, timeout=400, interval=0.2, what="a published epoch")
    ask()  # the published model is served
    assert answers[-1][1] == answers[-1][2] > served_before, answers[-1]
    # kill right after an epoch boundary: mid-epoch
    epoch = wait_for(lambda: (e := train_stats(srv).get("epoch", 0)) > stats["epoch"] and e, timeout=300,
                     interval=0.05, what="the next epoch")
    proc = train_process(srv)
    assert proc is not None, srv["server"].tail()
    for child in proc.children(recursive=True):
        child.kill()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    served = os.stat(srv["model"]).st_mtime
    killed_at_epoch = epoch + 1

    assert all(status == 200 for status, _, _ in answers), answers
    # every answer came from the model file served at that moment: the old one, or one the run published
    assert all(ts == served_before or served_before < ts <= now for _, ts, now in answers), answers
    done = wait_train_done(srv, timeout=60)
    assert done["status"] == "ERROR", dump(done)  # MONAI Label: a killed subprocess is an error
    info = requests.get(f"{srv['url']}/info/", timeout=60).json()
    assert info["train_stats"]["segdiff_train"]["status"] == "STOPPED"
    # the last published model is whole and served; no label changed
    assert os.stat(srv["model"]).st_mtime == served
    _, cfg, _ = load_checkpoint(srv["model"])
    assert cfg.network == "concat" and cfg.labels == ["organ", "lesion"]
    r = infer(srv, image=ids[0], params={"samples": 2})
    assert r.status_code == 200 and r.json()["model_ts"] == served, r.text
    assert label_digests(srv["studies"]) == labels_before

    # the next training starts cleanly and finishes
    t0 = time.perf_counter()
    r = train(srv, {"pretrained": True, "max_epochs": 1, "iterations_per_epoch": 2, "train_batch_size": 2,
                    "val_split": 0, "tracking": "none"})
    assert r.status_code == 200, r.text
    done = wait_train_done(srv, timeout=300)
    assert done["status"] == "DONE", dump(done) + srv["server"].tail()
    assert train_stats(srv)["status"] == "DONE"
    load_checkpoint(srv["model"])
    assert label_digests(srv["studies"]) == labels_before
    RESULTS["faults"] = {"infers during training": len(answers), "killed in epoch": killed_at_epoch,
                         "next training s": round(time.perf_counter() - t0, 1)}


def test_restart_after_sigkill_keeps_labels_and_scores(srv):
    scores = wait_for(lambda: scores_current(srv), timeout=300, interval=1, what="scores of the served model")
    wait_for(lambda: task_idle(srv["url"], "scoring"), timeout=120, what="scoring to finish")
    before = objects(srv)
    labels = label_digests(srv["studies"])
    server = srv["server"]
    os.killpg(server.proc.pid, signal.SIGKILL)  # the server and its subprocesses, no clean shutdown
    server.proc.wait(timeout=30)

    t0 = time.perf_counter()
    new = srv["start"](srv["studies"], srv["conf"], srv["root"] / "server2.log")
    RESULTS["restart s"] = round(time.perf_counter() - t0, 1)
    srv.update(server=new, url=new.url)
    after = objects(srv)
    assert label_digests(srv["studies"]) == labels
    assert {i: sorted(o["labels"]) for i, o in after.items()} == {i: sorted(o["labels"]) for i, o in before.items()}
    assert scores_current(srv) == scores  # kept, not recomputed
    assert (srv["studies"] / ".segdiff" / "replaced" / "final" / "phantom_001.nii.gz").is_file()
    r = infer(srv, image=srv["unlabeled"][0])
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------------------
# 4. training needs two labelled images
# --------------------------------------------------------------------------------------------------
def test_training_with_zero_or_one_labelled_image_is_refused(srv):
    labelled = sorted(i for i, o in objects(srv).items() if "final" in o["labels"])
    for image in labelled[1:]:  # an admin removes all final labels but one
        r = requests.delete(f"{srv['url']}/datastore/label", params={"id": image, "tag": "final"}, timeout=60)
        assert r.status_code == 200, r.text
    count = lambda: sum("final" in o["labels"] for o in objects(srv).values())  # noqa: E731
    wait_for(lambda: count() == 1, timeout=60, interval=0.5, what="labels removed")
    assert_4xx(train(srv, {"max_epochs": 1}), 422, "at least 2 images with a final label", "has 1")
    requests.delete(f"{srv['url']}/datastore/label", params={"id": labelled[0], "tag": "final"}, timeout=60)
    wait_for(lambda: count() == 0, timeout=60, interval=0.5, what="last label removed")
    assert_4xx(train(srv, {"max_epochs": 1}), 422, "has 0")
    assert task_idle(srv["url"], "train")
    kept = srv["studies"] / ".segdiff" / "replaced" / "final"
    assert {p.name for p in kept.iterdir()} >= {f"{i}.nii.gz" for i in labelled}  # removed labels are kept
    still_serving(srv)
