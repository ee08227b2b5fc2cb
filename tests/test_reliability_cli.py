"""Reliability without a server (issue 8): bad input to the ``segdiff`` command line -- one line on
stderr, exit code 2, no traceback -- and atomic writes: a save interrupted before its rename, or killed
with SIGKILL, leaves the previous checkpoint / label / datastore file intact, and a reader never sees
half a file. The server side is in ``test_reliability.py``; results are counted in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PHANTOMS, app_module, wait_for

from monai_segdiff.cli import main
from monai_segdiff.config import load_checkpoint, save_checkpoint
from monai_segdiff.errors import CheckpointError

_localstore = app_module("lib.localstore")
SegDiffLocalDatastore, copy_atomic, write_text_atomic = (
    _localstore.SegDiffLocalDatastore, _localstore.copy_atomic, _localstore.write_text_atomic
)

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE = PHANTOMS / "phantom_000.nii.gz"


def phantom() -> nib.Nifti1Image:
    return nib.load(str(SOURCE))


def save(tmp: Path, name: str, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = tmp / name
    nib.save(nib.Nifti1Image(array, phantom().affine if affine is None else affine), str(path))
    return path


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``segdiff ARGS`` in this process: ``(exit code, stderr)``; argparse errors included."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse: usage + one error line, exit 2
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.strip().splitlines() if ": error: " in ln]
    assert len(errors) == 1 and errors[0].startswith("segdiff "), err
    for word in words:
        assert word in errors[0], (word, errors[0])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Bad images, one file each."""
    tmp = tmp_path_factory.mktemp("bad_images")
    src = phantom()
    a = np.asarray(src.dataobj).astype(np.float32)
    truncated = tmp / "truncated.nii.gz"
    truncated.write_bytes(SOURCE.read_bytes()[: SOURCE.stat().st_size // 2])
    # a header declaring 4096^3 voxels (a decompression bomb), 1 kB of data: refused before any is read
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4096, 4096, 4096))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    (tmp / "bomb.nii").write_bytes(hdr.binaryblock + b"\0" * (4 + 1024))
    return {
        "truncated": truncated,
        "4d": save(tmp, "four_d.nii.gz", np.stack([a] * 3, -1)),
        "all_nan": save(tmp, "all_nan.nii.gz", np.full(a.shape, np.nan, np.float32)),
        "bomb": tmp / "bomb.nii",
        "coarse": save(tmp, "coarse.nii.gz", a[:, :, :4], np.diag([50.0, 50.0, 1.0, 1.0])),
        "ok": SOURCE,
    }


# --------------------------------------------------------------------------------------------------
# segdiff infer
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, words",
    [
        ("truncated", ["cannot read image", "Compressed file ended"]),
        ("4d", ["channel"]),
        ("all_nan", ["no finite voxel"]),
        ("bomb", ["too large", "4096"]),
    ],
)
def test_cli_infer_refuses_bad_images(case, words, images, tiny_model, tmp_path, capsys):
    rc, err = cli(capsys, "infer", "--model", tiny_model, "--image", images[case], "--output", tmp_path, "--quiet")
    assert_one_line_error(rc, err, *words)
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_infer_refuses_a_grid_too_large_after_resampling(images, tiny_model, tmp_path, capsys):
    # 50 mm voxels resampled to the model's 0.5 mm: 6400 x 6400 x 4 voxels, refused before Spacingd
    state, cfg, _ = load_checkpoint(tiny_model)
    fine = save_checkpoint(tmp_path / "fine.pt", state, cfg.replace(spacing=[0.5, 0.5, -1.0]))
    rc, err = cli(capsys, "infer", "--model", fine, "--image", images["coarse"], "--output", tmp_path / "out",
                  "--quiet")
    assert_one_line_error(rc, err, "would be", "limit")


def test_cli_infer_refuses_a_corrupted_checkpoint_and_bad_options(images, tiny_model, tmp_path, capsys):
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 3])
    args = ["infer", "--image", images["ok"], "--output", tmp_path / "out", "--quiet"]
    assert_one_line_error(*cli(capsys, *args, "--model", corrupted), "not a readable monai-segdiff checkpoint")
    assert_one_line_error(*cli(capsys, *args, "--model", tmp_path / "never_trained.pt"), "not found")
    assert_one_line_error(*cli(capsys, *args, "--model", tiny_model, "--steps", "-1"), "steps")
    assert_one_line_error(*cli(capsys, *args, "--model", tiny_model, "--samples", "-3"), "samples")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# segdiff train
# --------------------------------------------------------------------------------------------------
def studies_with(tmp: Path, label_for: dict[str, np.ndarray | None], affine: np.ndarray | None = None) -> Path:
    """A studies folder with the phantoms named in ``label_for`` and their labels (None: unlabelled)."""
    (tmp / "labels" / "final").mkdir(parents=True)
    shutil.copy(PHANTOMS / "labels.json", tmp / "labels.json")
    for name, label in label_for.items():
        shutil.copy(PHANTOMS / f"{name}.nii.gz", tmp / f"{name}.nii.gz")
        if label is not None:
            aff = nib.load(str(PHANTOMS / f"{name}.nii.gz")).affine if affine is None else affine
            nib.save(nib.Nifti1Image(label, aff), str(tmp / "labels" / "final" / f"{name}.nii.gz"))
    return tmp


def truth(name: str) -> np.ndarray:
    return np.asarray(nib.load(str(PHANTOMS / "labels" / "final" / f"{name}.nii.gz")).dataobj).astype(np.uint8)


TRAIN = ["--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "2", "--network", "concat",
         "--channels", "8,16,16", "--quiet", "--tensorboard", "none"]


def test_cli_train_refuses_bad_labels(tmp_path, capsys):
    outside = truth("phantom_001")
    outside[0, 0, 0] = 9
    shifted = nib.load(str(PHANTOMS / "phantom_001.nii.gz")).affine.copy()
    shifted[:3, 3] += 7.0
    cases = {
        "values outside the label set": (studies_with(tmp_path / "a", {"phantom_000": truth("phantom_000"),
                                                                       "phantom_001": outside}), None),
        "shape mismatch": (studies_with(tmp_path / "b", {"phantom_000": truth("phantom_000"),
                                                        "phantom_001": truth("phantom_001")[:40]}), "shape"),
        "affine mismatch": (studies_with(tmp_path / "c", {"phantom_001": truth("phantom_001")}, shifted), "geometry"),
    }
    for what, (studies, word) in cases.items():
        out = tmp_path / f"{studies.name}.pt"
        rc, err = cli(capsys, "train", "--studies", studies, "--output", out, *TRAIN)
        assert_one_line_error(rc, err, word or "outside the label set")
        assert not out.exists(), what


def test_cli_train_refuses_unknown_network_and_foreign_label_set(tiny_model, tmp_path, capsys):
    studies = studies_with(tmp_path / "s", {"phantom_000": truth("phantom_000"), "phantom_001": truth("phantom_001")})
    rc, err = cli(capsys, "train", "--studies", studies, "--output", tmp_path / "x.pt", "--network", "nope")
    assert rc == 2 and "invalid choice: 'nope'" in err.strip().splitlines()[-1] and "Traceback" not in err
    # a checkpoint trained for other labels is not fine-tuned on this label set
    state, cfg, _ = load_checkpoint(tiny_model)
    other = save_checkpoint(tmp_path / "other.pt", state, cfg.replace(labels=["liver", "tumour"]))
    rc, err = cli(capsys, "train", "--studies", studies, "--output", tmp_path / "x.pt", "--init", other, *TRAIN)
    assert_one_line_error(rc, err, "labels", "liver")
    assert not (tmp_path / "x.pt").exists()


def test_cli_train_zero_and_one_labelled_case(tmp_path, capsys):
    none = studies_with(tmp_path / "none", {"phantom_000": None, "phantom_001": None})
    assert_one_line_error(*cli(capsys, "train", "--studies", none, "--output", tmp_path / "n.pt", *TRAIN),
                          "no labelled image")
    # one labelled case (plus a label whose image does not exist, which the datalist ignores): the
    # command line trains without a validation split; the server refuses (see test_reliability.py)
    one = studies_with(tmp_path / "one", {"phantom_000": truth("phantom_000"), "phantom_001": None})
    shutil.copy(PHANTOMS / "labels" / "final" / "phantom_002.nii.gz", one / "labels" / "final" / "ghost.nii.gz")
    rc, err = cli(capsys, "train", "--studies", one, "--output", tmp_path / "one.pt", *TRAIN)
    assert rc == 0, err
    assert load_checkpoint(tmp_path / "one.pt")[1].labels == ["organ", "lesion"]


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------
def test_checkpoint_save_interrupted_before_rename_keeps_the_old_file(tiny_model, tmp_path):
    path = tmp_path / "model.pt"
    state, cfg, _ = load_checkpoint(tiny_model)
    save_checkpoint(path, state, cfg)
    before = path.read_bytes()
    with pytest.raises(Exception):  # pickling fails half-way through torch.save, before the rename
        save_checkpoint(path, state, cfg.replace(labels=["other"]), unpicklable=lambda: None)
    assert path.read_bytes() == before
    assert load_checkpoint(path)[1].labels == cfg.labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


WRITER = """
import sys, torch
from monai_segdiff.config import SegDiffConfig, save_checkpoint
cfg = SegDiffConfig(labels=["organ"])
state = {"w": torch.randn(2_000_000)}  # 8 MB: a save takes long enough to be cut
n = 0
while True:
    save_checkpoint(sys.argv[1], state, cfg, n=n)
    n += 1
    open(sys.argv[2], "w").write(str(n))
"""


def test_checkpoint_writer_killed_with_sigkill_leaves_a_loadable_file(tmp_path):
    path, count = tmp_path / "model.pt", tmp_path / "count"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(count)])
    try:
        wait_for(lambda: count.is_file() and count.read_text().strip() and int(count.read_text()) >= 2,
                 timeout=120, interval=0.02, what="two saves")
        time.sleep(0.01)  # most likely inside torch.save now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    _, cfg, rest = load_checkpoint(path)  # the last complete save, never a partial one
    assert cfg.labels == ["organ"] and rest["n"] >= 1


def test_label_copy_is_atomic_for_concurrent_readers(tmp_path):
    a, b = truth("phantom_000"), np.zeros_like(truth("phantom_000"))
    b[10:20, 10:20, 5:10] = 2
    src = [save(tmp_path, "a.nii.gz", a), save(tmp_path, "b.nii.gz", b)]
    dest = tmp_path / "labels" / "final.nii.gz"
    dest.parent.mkdir()
    copy_atomic(str(src[0]), str(dest))
    stop, errors, reads = threading.Event(), [], [0]

    def writer():
        i = 0
        while not stop.is_set():
            copy_atomic(str(src[i % 2]), str(dest))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(150):
            try:
                data = np.asarray(nib.load(str(dest)).dataobj)
                assert np.array_equal(data, a) or np.array_equal(data, b)
                reads[0] += 1
            except Exception as e:  # a half-written file would fail to decompress or differ
                errors.append(repr(e))
    finally:
        stop.set()
        t.join()
    assert not errors and reads[0] == 150
    assert sorted(p.name for p in dest.parent.iterdir()) == ["final.nii.gz"]
    with pytest.raises(IsADirectoryError):  # a copy that fails before the rename leaves the old file
        copy_atomic(str(tmp_path), str(dest))
    assert np.asarray(nib.load(str(dest)).dataobj).shape == a.shape


def test_datastore_file_written_atomically_and_rebuilt_when_corrupt(tmp_path):
    studies = studies_with(tmp_path / "s", {"phantom_000": truth("phantom_000"), "phantom_001": None})
    store = SegDiffLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    store.update_image_info("phantom_001", {"segdiff_uncertainty": 0.5})
    config = studies / "datastore_v2.json"
    before = config.read_text()
    with pytest.raises(UnicodeEncodeError):  # a write that fails half-way leaves the old file
        write_text_atomic(str(config), '{"name": "\udcff"}')
    assert config.read_text() == before and json.loads(before)["objects"]["phantom_001"]
    # a file cut by a crash of an older (non-atomic) writer: set aside, rebuilt from the files
    config.write_text(before[: len(before) // 2])
    store = SegDiffLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    assert store.get_labeled_images() == ["phantom_000"] and store.get_unlabeled_images() == ["phantom_001"]
    assert len(list(studies.glob("datastore_v2.json.corrupt-*"))) == 1
    json.loads(config.read_text())
    assert not [p for p in studies.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_error_is_a_clear_message(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable monai-segdiff checkpoint"):
        load_checkpoint(junk)
    torch.save({"model": {}, "config": {"labels": []}}, tmp_path / "bad_config.pt")
    with pytest.raises(CheckpointError, match="invalid config"):
        load_checkpoint(tmp_path / "bad_config.pt")
