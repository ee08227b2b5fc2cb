"""End to end against a real PACS: Orthanc with its DICOMweb plugin on loopback (own port, temporary
storage and configuration), the sample chest CT uploaded as a DICOM series (``sample-data/make_dicom.py``),
and ``monailabel start_server --app apps/segdiff --studies http://127.0.0.1:PORT/dicom-web`` driven with
MONAILabelClient: next sample -> infer (NIfTI and ``output=dicom_seg``) -> submit a label, which must
arrive in Orthanc as a DICOM SEG whose segments carry the model's label names.

Needs the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (``.ci/run`` installs them). Skipped only
when the Orthanc binary is not installed, and never in CI (``CI`` set): there it fails instead.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from conftest import APP, REPO, dump, free_port, task_idle, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CHEST_CT = REPO / "sample-data" / "chest-ct"
MODEL_LABELS = {"background": 0, "organ": 1, "lesion": 2}  # the tiny test model's (conftest.tiny_config)


def make_dicom():
    """``sample-data/make_dicom.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("make_dicom", REPO / "sample-data" / "make_dicom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------------------
def orthanc_binary() -> str | None:
    """The ``Orthanc`` executable (Debian installs it to /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("Orthanc")
    candidates = [found] if found else []
    candidates += ["/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc"]
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library, from the Debian package's file list or the usual places."""
    files: list[str] = []
    if shutil.which("dpkg"):
        out = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True)
        files = [f for f in out.stdout.split() if "libOrthancDicomWeb.so" in f] if out.returncode == 0 else []
    files += sorted(glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*"))
    files += sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))
    return next((f for f in files if os.path.isfile(f)), None)


class Orthanc:
    """An Orthanc server on 127.0.0.1 with a free HTTP port, no DICOM (DIMSE) port, no authentication,
    storage and configuration in ``root``; stopped by its own process id."""

    def __init__(self, binary: str, plugin: str, root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "orthanc.log"
        storage = root / "storage"
        storage.mkdir(parents=True)
        config = {
            "Name": "segdiff-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 1,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen([binary, str(self.config)], stdout=self._log_file, stderr=subprocess.STDOUT,
                                     cwd=str(root))

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if "dicom-web" in requests.get(f"{self.url}/plugins", timeout=5).json():
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Orthanc not ready after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()

    # -- REST API -------------------------------------------------------------------------------
    def upload(self, path: Path) -> dict:
        r = requests.post(f"{self.url}/instances", data=path.read_bytes(),
                          headers={"Content-Type": "application/dicom"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def find_series(self, **query: str) -> list[dict]:
        r = requests.post(f"{self.url}/tools/find", json={"Level": "Series", "Query": query, "Expand": True},
                          timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def instance(self, instance_id: str) -> pydicom.Dataset:
        r = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        assert r.status_code == 200, r.text
        return pydicom.dcmread(io.BytesIO(r.content))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    binary = orthanc_binary()
    if binary is None and shutil.which("apt-get"):  # a fresh machine: install it (root only)
        subprocess.run(["bash", str(Path(__file__).with_name("install_orthanc.sh"))], check=False)
        binary = orthanc_binary()
    if binary is None:
        reason = "Orthanc is not installed (Debian packages orthanc and orthanc-dicomweb; .ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: required in CI")
        pytest.skip(reason)
    plugin = dicomweb_plugin()
    assert plugin, f"{binary} found but not its DICOMweb plugin: apt-get install orthanc-dicomweb"
    server = Orthanc(binary, plugin, tmp_path_factory.mktemp("orthanc"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# the series in Orthanc and the MONAI Label server on it
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(orthanc, tmp_path_factory, tiny_model, start_server):
    root = tmp_path_factory.mktemp("dicomweb")
    mk = make_dicom()
    files = mk.make(root / "dicom", CHEST_CT / "chest_ct.nii.gz")
    uploaded = [orthanc.upload(f) for f in files]
    assert {u["Status"] for u in uploaded} == {"Success"}, uploaded
    model = root / "model" / "segdiff.pt"
    model.parent.mkdir()
    model.write_bytes(tiny_model.read_bytes())
    with pytest.MonkeyPatch.context() as mp:  # the server copies the environment when it starts
        mp.setenv("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(root / "cache"))
        server = start_server(
            f"{orthanc.url}/dicom-web",
            {"model_path": str(model), "samples": "2", "steps": "1", "scoring_samples": "2", "scoring_steps": "1"},
            root / "server.log",
        )
    yield {"root": root, "orthanc": orthanc, "server": server, "url": server.url, "dicom": root / "dicom",
           "series": mk.series_uid(), "study": str(pydicom.dcmread(files[0]).StudyInstanceUID)}
    server.stop()


def client(env, client_id: str):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(env["url"], tmpdir=str(env["root"]), client_id=client_id)


def ct_image(env) -> sitk.Image:
    """The series as MONAI Label reads it (SimpleITK's DICOM series reader)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(env["dicom"])))
    return reader.Execute()


def assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5)


def seg_values(seg: pydicom.Dataset, reference: sitk.Image) -> tuple[dict[int, str], np.ndarray]:
    """``({segment number: label}, segment-number array on ``reference``'s grid)`` of a DICOM SEG."""
    import pydicom_seg

    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    image = pydicom_seg.MultiClassReader().read(seg).image  # frames of non-empty slices only
    on_grid = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return labels, sitk.GetArrayFromImage(on_grid)


def as_model_values(labels: dict[int, str], segments: np.ndarray, names: dict[str, int] = MODEL_LABELS) -> np.ndarray:
    """Segment numbers -> the value of each segment's label in ``names`` (default: the model's)."""
    out = np.zeros(segments.shape, np.uint8)
    for number, name in labels.items():
        out[segments == number] = names[name]
    return out


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
def test_dicom_series_is_the_sample_ct(tmp_path):
    mk = make_dicom()
    first = mk.make(tmp_path / "a")
    again = mk.make(tmp_path / "b")
    assert [f.read_bytes() for f in first] == [f.read_bytes() for f in again]  # deterministic, UIDs included
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "a")))
    series, nifti = reader.Execute(), sitk.ReadImage(str(CHEST_CT / "chest_ct.nii.gz"))
    assert_same_grid(series, nifti)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(series), sitk.GetArrayViewFromImage(nifti))
    ds = pydicom.dcmread(first[0])
    assert ds.Modality == "CT" and ds.SeriesInstanceUID == mk.series_uid() and len(first) == nifti.GetSize()[2]


def test_orthanc_serves_the_series_over_dicomweb(env):
    r = requests.get(f"{env['orthanc'].url}/dicom-web/series", params={"Modality": "CT"}, timeout=30)
    assert r.status_code == 200, r.text
    uids = [s["0020000E"]["Value"][0] for s in r.json()]
    assert uids == [env["series"]]


def test_next_sample_is_the_series(env):
    sample = client(env, "annotator-a").next_sample("segdiff_uncertainty", {})
    assert sample["id"] == env["series"], dump(sample)
    assert sample["StudyInstanceUID"] == env["study"] and sample["Modality"] == "CT"
    # Slicer downloads the image it is told about: the series as a volume on the DICOM grid
    r = requests.get(f"{env['url']}/datastore/image", params={"image": env["series"]}, timeout=60)
    assert r.status_code == 200
    path = env["root"] / "downloaded.nii.gz"
    path.write_bytes(r.content)
    assert_same_grid(sitk.ReadImage(str(path)), ct_image(env))


def test_infer_on_the_series(env):
    result, out = client(env, "annotator-a").infer("segdiff", env["series"], {})
    label = sitk.ReadImage(result)
    assert_same_grid(label, ct_image(env))
    values = sitk.GetArrayFromImage(label)
    assert set(np.unique(values)) <= set(MODEL_LABELS.values())
    assert out["label_names"] == MODEL_LABELS and out["samples"] == 2 and out["steps"] == 1, dump(out)
    assert set(out["uncertainty_stats"]) == {"organ", "lesion"}
    env["prediction"] = values


def test_infer_as_dicom_seg(env):
    assert env["prediction"].any(), "the tiny model predicted no foreground on the chest CT: no SEG to write"
    # what a DICOM viewer sends: every label of the model, whether present in the result or not
    params = {"label_info": [{"name": "organ", "idx": 1}, {"name": "lesion", "idx": 2}]}
    r = requests.post(f"{env['url']}/infer/segdiff", params={"image": env["series"], "output": "dicom_seg"},
                      data={"params": json.dumps(params)}, timeout=300)
    assert r.status_code == 200, r.text + "\n" + env["server"].tail()
    assert r.headers["content-type"] == "application/dicom"
    seg = pydicom.dcmread(io.BytesIO(r.content))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == env["study"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == env["series"]
    labels, segments = seg_values(seg, ct_image(env))
    present = [int(v) for v in np.unique(env["prediction"]) if v]
    names = {v: n for n, v in MODEL_LABELS.items()}
    assert sorted(labels.values()) == sorted(names[v] for v in present), labels  # named by value, not position
    np.testing.assert_array_equal(as_model_values(labels, segments), env["prediction"])  # the same answer


def test_submitted_label_arrives_in_orthanc_as_dicom_seg(env):
    truth = sitk.ReadImage(str(CHEST_CT / "labels" / "final" / "chest_ct.nii.gz"))  # 1 lung, 2 spine, 3 ribs
    t = sitk.GetArrayFromImage(truth)
    # an annotator's export from Slicer: segment 1 "lesion" (here: the spine), segment 2 "organ" (the lungs),
    # segment 3 "ribs", a name the model does not know: kept as a new label of the label set, not dropped
    exported = np.zeros_like(t)
    exported[t == 2] = 1
    exported[t == 1] = 2
    exported[t == 3] = 3
    submitted = sitk.GetImageFromArray(exported)
    submitted.CopyInformation(truth)
    path = env["root"] / "submitted.nii.gz"
    sitk.WriteImage(submitted, str(path))
    assert not env["orthanc"].find_series(Modality="SEG")
    label_info = [{"name": "lesion", "idx": 1}, {"name": "organ", "idx": 2}, {"name": "ribs", "idx": 3}]
    res = client(env, "annotator-a").save_label(env["series"], str(path), params={"label_info": label_info})
    assert res["image"] == env["series"] and res["remapped"] == {"1": 2, "2": 1}, dump(res)
    label_set = {**MODEL_LABELS, "ribs": 3}  # the PACS's label set: the model's labels, extended
    assert res["label_set"] == label_set and res["added"] == {"ribs": 3}, dump(res)
    assert res["upload_kept"] == f".segdiff/uploads/final/{env['series']}.nii.gz", dump(res)  # in the set's folder

    segs = env["orthanc"].find_series(Modality="SEG")
    assert len(segs) == 1 and len(segs[0]["Instances"]) == 1, dump(segs)
    seg = env["orthanc"].instance(segs[0]["Instances"][0])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.StudyInstanceUID == env["study"] and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == env["series"]
    labels, segments = seg_values(seg, ct_image(env))
    assert sorted(labels.values()) == ["lesion", "organ", "ribs"], labels
    expected = np.zeros_like(t)
    expected[t == 1] = MODEL_LABELS["organ"]  # the lungs, submitted as "organ"
    expected[t == 2] = MODEL_LABELS["lesion"]
    expected[t == 3] = 3  # the ribs, every voxel kept
    np.testing.assert_array_equal(as_model_values(labels, segments, label_set), expected)

    # MONAI Label's copy (what Slicer downloads, and training reads) holds the model's values too
    objects = client(env, "test").datastore()["objects"]
    final = objects[env["series"]]["labels"]["final"]
    assert final["info"]["SeriesInstanceUID"] == seg.SeriesInstanceUID, dump(final)
    downloaded = sitk.ReadImage(client(env, "annotator-a").download_label(env["series"], "final"))
    assert_same_grid(downloaded, ct_image(env))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(downloaded), expected)
    # and the series counts as labeled at once (not after MONAI Label's 2 h cache of labeled series)
    assert client(env, "annotator-b").next_sample("segdiff_uncertainty", {}) == {}


def test_seg_from_the_pacs_is_read_by_segment_name_on_the_image_grid(env, tmp_path, monkeypatch):
    """A SEG stored by another tool (dcmqi, as 3D Slicer writes them) whose segment 1 is "lesion" and
    whose frames cover only the slices the segment touches trains as lesion (value 2, not segment
    number 1) on the image's grid; read through the app's datastore from a fresh cache, as training does."""
    from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    monkeypatch.syspath_prepend(str(APP))
    from lib.datastore import SegDiffDICOMWebDatastore

    mk = make_dicom()
    other = mk.make(tmp_path / "dicom", name="chest_ct_other")
    for f in other:
        env["orthanc"].upload(f)
    truth = sitk.ReadImage(str(CHEST_CT / "labels" / "final" / "chest_ct.nii.gz"))
    t = sitk.GetArrayFromImage(truth)
    assert not (t == 1)[0].any()  # the lungs start a few slices up: the SEG has fewer frames than slices
    lungs = sitk.Cast(sitk.Equal(truth, 1), sitk.sitkUInt8)
    sitk.WriteImage(lungs, str(tmp_path / "lungs.nii.gz"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    seg_file = nifti_to_dicom_seg(str(tmp_path / "dicom"), str(tmp_path / "lungs.nii.gz"), [{"name": "lesion"}])
    assert pydicom.dcmread(seg_file).NumberOfFrames < t.shape[0]
    assert env["orthanc"].upload(Path(seg_file))["Status"] == "Success"

    dw = DICOMwebClientX(url=f"{env['orthanc'].url}/dicom-web")
    store = DICOMWebDatastore(dw, {"Modality": "CT"}, cache_path=str(tmp_path / "cache"))
    store = SegDiffDICOMWebDatastore.adopt(store, str(tmp_path / "label-set"), lambda: ["organ", "lesion"])
    items = {Path(d["image"]).name.split(".nii")[0]: d["label"] for d in store.datalist()}
    assert sorted(items) == sorted([env["series"], mk.series_uid("chest_ct_other")]), items
    for series, expected in ((mk.series_uid("chest_ct_other"), np.where(t == 1, 2, 0)),
                             (env["series"], np.select([t == 1, t == 2, t == 3], [1, 2, 3], 0))):  # ribs: new
        label = sitk.ReadImage(items[series])
        assert_same_grid(label, ct_image(env))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected)


def test_unknown_series_is_404(env):
    r = requests.post(f"{env['url']}/infer/segdiff", params={"image": "1.2.3.4.5"}, data={"params": "{}"}, timeout=60)
    assert r.status_code == 404 and "1.2.3.4.5" in r.text, r.text


def test_server_log_has_no_traceback(env):
    wait_for(lambda: task_idle(env["url"], "scoring"), timeout=120, what="scoring to finish")
    log = Path(env["server"].log).read_text(errors="replace")
    assert "Traceback" not in log, env["server"].tail(80)
