"""``segdiff evaluate``: known answers through the report code (a fake segmenter on constructed cases),
then a real tiny checkpoint end to end on phantoms (files exist and hold real numbers)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import torch
from conftest import strict_json
from monai.data import MetaTensor

from monai_segdiff.config import SegDiffConfig
from monai_segdiff.diffusion.inferer import EnsembleOutput
from monai_segdiff.cli import add_evaluate_parser, cmd_evaluate
from monai_segdiff.evaluation import evaluate
from monai_segdiff.io import load_image
from monai_segdiff.metrics import binned_auroc, spearman
from monai_segdiff.segmenter import Prediction

PHANTOMS = Path(__file__).resolve().parents[1] / "sample-data" / "phantoms"
SHAPE = (16, 16, 8)
VOXELS = int(np.prod(SHAPE))
N_ERRORS, N_UNCERTAIN_CORRECT = 8, 24  # the "known" case

pytestmark = pytest.mark.usefixtures("one_thread")


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------- constructed cases, known answers
def truth_volume() -> np.ndarray:
    t = np.zeros(SHAPE, dtype=np.uint8)
    t[3:13, 3:13, 2:6] = 1  # organ
    t[6:9, 6:9, 3:5] = 2  # lesion inside it
    return t


def write(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


@pytest.fixture(scope="module")
def constructed(tmp_path_factory) -> Path:
    """Three cases with identity affines (input grid = preprocessed grid) and their intended predictions:
    ``perfect`` (exact; raters equal the truth), ``known`` (8 organ voxels missed, uncertainty 1 on them
    and on 24 correct far-background voxels), ``nolesion`` (lesion missed entirely)."""
    root = tmp_path_factory.mktemp("constructed")
    truth = truth_volume()
    rng = np.random.default_rng(0)
    for name in ("perfect", "known", "nolesion"):
        write((rng.normal(size=SHAPE) * 10 + truth * 50).astype(np.float32), root / f"{name}.nii.gz")
        write(truth, root / "labels" / "final" / f"{name}.nii.gz")
    for tag in ("rater1", "rater2"):
        write(truth, root / "labels" / tag / "perfect.nii.gz")
    (root / "labels.json").write_text(json.dumps({"background": 0, "organ": 1, "lesion": 2}))
    return root


class FakeSegmenter:
    """Returns the intended prediction of each constructed case, in the real ``Prediction`` type."""

    def __init__(self):
        self.cfg = SegDiffConfig(labels=["organ", "lesion"], network="concat", channels=[8, 8], norm_num_groups=8,
                                 attention_levels=[False, False], spacing=[-1, -1, -1], roi_size=[16, 16])
        self.num_samples = 3
        self.uncertainty_kind = "entropy"

    @staticmethod
    def scenario(name: str):
        pred = torch.from_numpy(truth_volume()).long()
        unc = torch.zeros(SHAPE)
        score = {"perfect": 0.0, "known": 0.5, "nolesion": 0.9}[name]
        if name == "known":
            organ_only = torch.nonzero(pred == 1)[:N_ERRORS]
            for x, y, z in organ_only.tolist():
                pred[x, y, z] = 0
                unc[x, y, z] = 1.0
            unc[0, 0, :8] = 1.0  # 24 correct background voxels far from any foreground
            unc[15, 0, :8] = 1.0
            unc[0, 15, :8] = 1.0
        if name == "nolesion":
            pred[pred == 2] = 1
        return pred, unc, score

    def __call__(self, path: str) -> Prediction:
        img = load_image(path)
        name = Path(path).name.split(".")[0]
        pred, unc, score = self.scenario(name)
        probs = torch.nn.functional.one_hot(pred, 3).permute(3, 0, 1, 2).float()
        ens = EnsembleOutput(probs, pred[None].repeat(3, 1, 1, 1).to(torch.uint8), torch.zeros(SHAPE))
        label = MetaTensor(pred[None].to(torch.uint8), meta=dict(img.meta))
        umap = MetaTensor(unc[None], meta=dict(img.meta))
        stats = {"case_score": score, "timings": {"total_s": 0.01}}
        return Prediction(label, umap, ens, img, stats)


@pytest.fixture(scope="module")
def constructed_report(constructed, tmp_path_factory):
    from monai_segdiff import data

    out = tmp_path_factory.mktemp("report")
    report = evaluate(FakeSegmenter(), data.datalist(constructed), out, meta={"model": "fake", "studies": str(constructed)})
    return report, out


def test_perfect_prediction_scores_dice_one(constructed_report):
    report, out = constructed_report
    saved = strict_json(out / "report.json")
    case = next(c for c in saved["cases"] if c["id"] == "perfect")
    assert case["dice"] == {"organ": 1.0, "lesion": 1.0}
    assert case["hd95"] == {"organ": 0.0, "lesion": 0.0}
    assert case["ece"] == pytest.approx(0.0, abs=1e-7)
    assert case["error_voxels"] == 0
    assert case["auroc"] is None  # no wrong voxel: AUROC undefined, written as null
    assert case["raters"] == 2 and case["ged"] == pytest.approx(0.0) and case["ci"] == pytest.approx(1.0)
    assert saved["summary"]["ged"]["n"] == 1


def test_auroc_of_a_constructed_case_has_its_known_value(constructed_report):
    report, out = constructed_report
    saved = strict_json(out / "report.json")
    case = next(c for c in saved["cases"] if c["id"] == "known")
    n_neg = VOXELS - N_ERRORS
    # every error has uncertainty 1; 24 of the correct voxels tie with them (1/2 each), the rest are 0
    assert case["error_voxels"] == N_ERRORS
    assert case["auroc"] == pytest.approx(1.0 - N_UNCERTAIN_CORRECT / (2 * n_neg), abs=1e-12)
    assert case["auroc_foreground"] == pytest.approx(1.0)  # the tied correct voxels are far background
    # the ensemble of this fake is one-hot and unanimous: every library map is flat, an uninformative 0.5
    assert case["auroc_by_uncertainty"] == {k: 0.5 for k in ("entropy", "mutual_information", "variance", "disagreement")}
    # pooled over the three cases: the other cases add correct voxels at uncertainty 0
    errors = N_ERRORS + 9 * 2  # + the missed lesion of "nolesion" (3x3x2 voxels)
    negatives = 3 * VOXELS - errors
    pos_at_one = N_ERRORS / errors
    expected = pos_at_one * (1 - N_UNCERTAIN_CORRECT / (2 * negatives)) + (1 - pos_at_one) * 0.5 * (
        (negatives - N_UNCERTAIN_CORRECT) / negatives)
    assert saved["summary"]["auroc"]["pooled"] == pytest.approx(expected, abs=1e-12)


def test_missing_label_gives_zero_dice_and_undefined_hd95(constructed_report):
    _, out = constructed_report
    saved = strict_json(out / "report.json")
    case = next(c for c in saved["cases"] if c["id"] == "nolesion")
    assert case["dice"]["lesion"] == 0.0 and case["hd95"]["lesion"] is None
    assert saved["summary"]["hd95"]["lesion"]["n_undefined"] == 1
    # case scores 0, 0.5, 0.9 go with mean Dice 1 > ~0.98 > 0.5+: a perfect negative rank correlation
    assert saved["summary"]["spearman_case_score_vs_dice"]["rho"] == pytest.approx(-1.0)


def test_report_files_exist_with_real_numbers(constructed_report):
    report, out = constructed_report
    for name in report["pictures"].values():
        assert is_png(out / name), name
    assert {"best_case", "worst_case", "reliability", "uncertainty_vs_error", "case_score_vs_dice"} <= set(report["pictures"])
    html = (out / "report.html").read_text()
    assert "<table>" in html and "worst_case.png" in html and "nolesion" in html
    assert report["summary"]["mean_dice"]["max"] == 1.0


def test_binned_auroc_and_spearman_helpers():
    assert binned_auroc(np.array([0, 0, 2]), np.array([3, 1, 0])) == 1.0
    # one error and one correct voxel per bin: (1/2 + (1 + 1/2)) / (2 * 2)
    assert binned_auroc(np.array([1, 1]), np.array([1, 1])) == pytest.approx(0.5)
    assert math.isnan(binned_auroc(np.array([0, 0]), np.array([1, 1])))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40])["rho"] == pytest.approx(1.0)
    assert spearman([1, 2, None], [3, 2, 1])["rho"] is None


# ------------------------------------------------------------------- a real tiny model, CLI entry point
@pytest.fixture(scope="module")
def phantom_studies(tmp_path_factory) -> Path:
    """Three phantoms (one with flipped axes, so the preprocessed grid differs from the input grid)
    with final and rater labels."""
    root = tmp_path_factory.mktemp("studies")
    for i in (0, 1, 12):
        name = f"phantom_{i:03d}.nii.gz"
        shutil.copy(PHANTOMS / name, root / name)
        for tag in ("final", "rater1", "rater2"):
            (root / "labels" / tag).mkdir(parents=True, exist_ok=True)
            shutil.copy(PHANTOMS / "labels" / tag / name, root / "labels" / tag / name)
    shutil.copy(PHANTOMS / "labels.json", root / "labels.json")
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(phantom_studies, tmp_path_factory) -> Path:
    from monai_segdiff import data
    from monai_segdiff.training import train

    cfg = SegDiffConfig(labels=["organ", "lesion"], network="medsegdiff", channels=[8, 16, 16], norm_num_groups=8,
                        attention_levels=[False] * 3, spacing=[-1, -1, -1], roi_size=[64, 64], sample_steps=2,
                        num_samples=3)
    out = tmp_path_factory.mktemp("model") / "tiny.pt"
    train(cfg, data.labelled(data.datalist(phantom_studies)), (), output=out, epochs=1, iterations_per_epoch=5,
          batch_size=4)
    return out


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="segdiff")
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    return cmd_evaluate(parser.parse_args(argv))


def test_evaluate_cli_on_a_trained_checkpoint(phantom_studies, tiny_checkpoint, tmp_path):
    out = tmp_path / "report"
    rc = run_cli(["evaluate", "--model", str(tiny_checkpoint), "--studies", str(phantom_studies), "--report", str(out),
                  "--samples", "2", "--steps", "2", "--quiet"])
    assert rc == 0
    saved = strict_json(out / "report.json")
    s = saved["summary"]
    assert s["cases"] == 3 and [c["id"] for c in saved["cases"]] == ["phantom_000", "phantom_001", "phantom_012"]
    for c in saved["cases"]:
        assert 0.0 <= c["dice"]["organ"] <= 1.0
        assert 0.0 <= c["auroc"] <= 1.0 and 0.0 <= c["ece"] <= 1.0
        assert c["raters"] == 2 and c["ged"] >= 0.0 and 0.0 <= c["ci"] <= 1.0
        assert c["timings"]["total_s"] > 0.0 and c["case_score"] >= 0.0
    assert 0.0 <= s["auroc"]["pooled"] <= 1.0 and 0.0 <= s["ece"]["pooled"] <= 1.0
    assert sum(saved["reliability"]["all"]["count"]) == 3 * 64 * 64 * 32
    assert saved["settings"]["samples"] == 2 and saved["settings"]["network"] == "medsegdiff"
    for name in saved["pictures"].values():
        assert is_png(out / name), name
    assert "phantom_012" in (out / "report.html").read_text()


def test_evaluate_val_subset_matches_the_train_split(phantom_studies, tiny_checkpoint, tmp_path):
    from monai_segdiff import data

    expected = [it["id"] for it in data.split(data.labelled(data.datalist(phantom_studies)), 0.34, seed=1)[1]]
    rc = run_cli(["evaluate", "--model", str(tiny_checkpoint), "--studies", str(phantom_studies), "--report",
                  str(tmp_path), "--subset", "val", "--val-split", "0.34", "--split-seed", "1", "--samples", "1",
                  "--no-pictures", "--quiet"])
    assert rc == 0
    saved = strict_json(tmp_path / "report.json")
    assert [c["id"] for c in saved["cases"]] == expected and saved["pictures"] == {}
