"""2D images end to end: PNG/JPG (RGB, grayscale) and 2D NIfTI through the transforms, ``segdiff train``
on the synthetic skin-lesion set (a tiny model that really learns), ``segdiff infer`` on a photo (PNG
mask + heat map), and a running MONAI Label server answering a 2D mask of the picture's size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, dump
from PIL import Image

from monai_segdiff import data, metrics
from monai_segdiff.cli import main
from monai_segdiff.config import load_checkpoint
from monai_segdiff.io import heatmap_rgb, load_image, load_label
from monai_segdiff.networks import build_network
from monai_segdiff.segmenter import Segmenter
from monai_segdiff.training import new_config
from monai_segdiff.transforms import apply, preprocess_transforms

SKIN = REPO / "sample-data" / "skin2d"
TRAIN_ARGS = ["--network", "concat", "--channels", "16,16,32", "--roi-size", "64,64", "--epochs", "3",
              "--iterations-per-epoch", "20", "--batch-size", "8", "--lr", "2e-3", "--steps", "2", "--samples", "3",
              "--quiet"]


def picture(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return float(metrics.dice_per_label(pred.long(), truth.long(), 2)[0])


# --------------------------------------------------------------------------------------------------
# reading pictures
# --------------------------------------------------------------------------------------------------
def test_pictures_load_as_channels_in_monai_axis_order(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)  # 30 rows (y) x 40 columns (x)
    rgb[1:9, 28:38] = [220, 100, 50]  # rows 1-8, columns 28-37
    images = {
        "rgb.png": picture(tmp_path / "rgb.png", rgb),
        "rgb.jpg": picture(tmp_path / "rgb.jpg", rgb),
        "rgba.png": picture(tmp_path / "rgba.png", np.dstack([rgb, np.full((30, 40), 255, np.uint8)])),
        "gray.png": picture(tmp_path / "gray.png", rgb[..., 0]),
    }
    for name, path in images.items():
        img = load_image(path)
        channels = 1 if name == "gray.png" else 3
        assert tuple(img.shape) == (channels, 40, 30), name  # [C, x, y]: MONAI's PILReader order
        assert float(img[0, 32, 4]) > 180 and float(img[0, 10, 20]) < 30, name  # pixel (row 4, column 32)
    nifti = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((24, 20)).astype(np.float32), np.diag([0.5, 0.7, 1, 1])), nifti)
    assert tuple(load_image(nifti).shape) == (1, 24, 20)


def test_masks_values_and_binary_255(tmp_path):
    """0/1, 0/255 and palette masks give the same label; other values are rejected clearly."""
    m = np.zeros((16, 24), np.uint8)
    m[4:9, 3:20] = 1
    zero_one = load_label(picture(tmp_path / "a.png", m))
    zero_255 = load_label(picture(tmp_path / "b.png", m * 255))
    pal = Image.fromarray(m, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "c.png")
    palette = load_label(tmp_path / "c.png")
    assert zero_one.shape == (1, 24, 16) and set(zero_one.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(zero_one, zero_255) and torch.equal(zero_one, palette)

    cfg = new_config([{"image": str(picture(tmp_path / "img.png", np.full((16, 24, 3), 90, np.uint8)))}], ["lesion"],
                     network="concat", channels=[16, 16, 32])
    chain = preprocess_transforms(cfg, label_keys=["label"])
    d = apply(chain, {"image": str(tmp_path / "img.png"), "label": str(tmp_path / "b.png")})
    assert torch.equal(d["label"].as_tensor(), zero_one.as_tensor())
    bad = picture(tmp_path / "bad.png", m * 7)
    with pytest.raises(ValueError, match="outside the label set"):
        apply(chain, {"image": str(tmp_path / "img.png"), "label": str(bad)})


def test_2d_config_and_preprocessing_keep_images_2d():
    items = data.labelled(data.datalist(SKIN))
    cfg = new_config(items, ["lesion"], network="concat", channels=[16, 16, 32])
    assert (cfg.image_dims, cfg.spatial_dims, cfg.context, cfg.image_channels) == (2, 2, 0, 3)
    assert cfg.in_channels == 3 and cfg.roi_size == [96, 96]
    d = apply(preprocess_transforms(cfg, label_keys=["label"]), {"image": items[0]["image"], "label": items[0]["label"]})
    assert tuple(d["image"].shape) == (3, 96, 96) and tuple(d["label"].shape) == (1, 96, 96)
    assert float(d["image"].min()) == -1.0 and float(d["image"].max()) == 1.0
    with pytest.raises(ValueError, match="spatial_dims 2"):
        new_config(items, ["lesion"], network="concat", spatial_dims=3, channels=[16, 16, 32])


# --------------------------------------------------------------------------------------------------
# the sample set
# --------------------------------------------------------------------------------------------------
def test_skin2d_sample_set(tmp_path):
    items = data.datalist(SKIN)
    assert 16 <= len(items) <= 24 and all("label" in it and len(it["raters"]) == 3 for it in items)
    assert json.loads((SKIN / "labels.json").read_text()) == {"background": 0, "lesion": 1}
    hairy = [c for c in json.loads((SKIN / "cases.json").read_text())["cases"] if c["hairs"]]
    assert 0 < len(hairy) < len(items)
    for it in items[:4]:
        img = Image.open(it["image"])
        assert img.mode == "RGB" and img.size == (96, 96)
        final = np.asarray(Image.open(it["label"]))
        assert set(np.unique(final)) == {0, 255}
        for r in it["raters"]:  # raters agree with the majority except along the border
            assert dice(torch.as_tensor(np.asarray(Image.open(r)) > 0), torch.as_tensor(final > 0)) > 0.8
    subprocess.run([sys.executable, str(REPO / "sample-data" / "make_skin2d.py"), "--output", str(tmp_path), "--count", "2"],
                   check=True, capture_output=True)
    for rel in ("skin_001.png", "labels/final/skin_001.png", "labels/rater3/skin_001.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / rel)), np.asarray(Image.open(SKIN / rel))), rel
    new_sets = [REPO / "sample-data" / "skin2d", REPO / "sample-data" / "multimodal"]
    assert sum(p.stat().st_size for s in new_sets for p in s.rglob("*") if p.is_file()) < 3 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# train -> infer with the CLI
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split():
    """16 training pictures (a studies folder of their own) and 4 held out."""
    return data.split(data.labelled(data.datalist(SKIN)), 0.2, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, split, one_thread) -> Path:
    root = tmp_path_factory.mktemp("skin")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(SKIN / "labels.json", studies)
    for it in split[0]:
        shutil.copy(it["image"], studies)
        shutil.copy(it["label"], studies / "labels" / "final")
    out = root / "skin.pt"
    assert main(["train", "--studies", str(studies), "--output", str(out), *TRAIN_ARGS]) == 0
    return out


def test_train_then_infer_learns_on_2d_rgb(trained, split):
    state, cfg, _ = load_checkpoint(trained)
    assert (cfg.image_dims, cfg.context, cfg.image_channels, cfg.labels) == (2, 0, 3, ["lesion"])
    torch.manual_seed(0)
    untrained = Segmenter(build_network(cfg), cfg, num_samples=3, steps=2)
    model = Segmenter.from_checkpoint(trained, num_samples=3, steps=2)
    scores = {"trained": [], "untrained": []}
    for it in split[1]:
        truth = load_label(it["label"])[0]
        for name, seg in (("trained", model), ("untrained", untrained)):
            pred = seg(it["image"])
            assert tuple(pred.label.shape) == (1, 96, 96) and tuple(pred.uncertainty.shape) == (1, 96, 96)
            scores[name].append(dice(pred.label[0], truth))
    trained_dice, untrained_dice = np.mean(scores["trained"]), np.mean(scores["untrained"])
    print(f"\nheld-out Dice: trained {trained_dice:.3f}, untrained {untrained_dice:.3f}")
    assert trained_dice > 0.7 and trained_dice > untrained_dice + 0.4, scores


def test_cli_infer_photo_writes_png_mask_and_heat_map(trained, split, tmp_path):
    it = split[1][0]
    photo = tmp_path / "photo.jpg"
    Image.open(it["image"]).save(photo, quality=92)
    assert main(["infer", "--model", str(trained), "--image", str(photo), "--output", str(tmp_path / "a"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["photo.json", "photo_seg.png", "photo_uncertainty.png"]
    mask = Image.open(tmp_path / "a" / "photo_seg.png")
    heat = Image.open(tmp_path / "a" / "photo_uncertainty.png")
    assert mask.mode == "L" and mask.size == (96, 96) and heat.mode == "RGB" and heat.size == (96, 96)
    values = np.asarray(mask)
    assert set(np.unique(values)) <= {0, 1}
    truth = np.asarray(Image.open(it["label"])) > 0  # same pixel layout as the photo
    assert dice(torch.as_tensor(values > 0), torch.as_tensor(truth)) > 0.6

    # NIfTI on request; the heat map is the float uncertainty map through the colour map
    assert main(["infer", "--model", str(trained), "--image", str(photo), "--output", str(tmp_path / "b"),
                 "--nifti", "--quiet"]) == 0
    seg = nib.load(tmp_path / "b" / "photo_seg.nii.gz")
    u = nib.load(tmp_path / "b" / "photo_uncertainty.nii.gz").get_fdata()
    assert seg.shape == (96, 96) and np.array_equal(np.asarray(seg.dataobj).T, values)
    heat_b = np.asarray(Image.open(tmp_path / "b" / "photo_uncertainty.png"))
    assert np.array_equal(heat_b, np.moveaxis(heatmap_rgb(u), 0, -1).transpose(1, 0, 2))
    assert u.max() > 0.2 and len(np.unique(heat_b.reshape(-1, 3), axis=0)) > 10  # a map, not a flat picture
    stats = json.loads((tmp_path / "b" / "photo.json").read_text())
    assert set(stats["outputs"]) == {"seg", "seg_png", "uncertainty", "heatmap"}

    # a grayscale picture for an RGB model: a one-line error, exit 2
    gray = tmp_path / "gray.png"
    Image.open(it["image"]).convert("L").save(gray)
    proc = subprocess.run([sys.executable, "-m", "monai_segdiff.cli", "infer", "--model", str(trained), "--image",
                           str(gray), "--output", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "segdiff infer: error: the model expects 3 image channel(s), the image has 1" in proc.stderr


# --------------------------------------------------------------------------------------------------
# the MONAI Label app
# --------------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_server_answers_2d_mask_of_the_picture_size(trained, split, start_server, tmp_path):
    from monailabel.client import MONAILabelClient

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SKIN / "labels.json", studies)
    held_out = split[1]
    for it in held_out:
        shutil.copy(it["image"], studies)
    model = tmp_path / "model" / "segdiff.pt"
    model.parent.mkdir()
    shutil.copy(trained, model)
    server = start_server(studies, {"model_path": str(model)}, tmp_path / "server.log")
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    info = client.info()
    assert info["models"]["segdiff"]["dimension"] == 2, dump(info["models"])
    assert info["labels"] == ["lesion", "background"]

    image_id = data.image_id(held_out[0]["image"])
    result, params = client.infer("segdiff", image_id, {})
    mask = Image.open(result)
    assert mask.size == Image.open(held_out[0]["image"]).size == (96, 96), server.tail()
    values = np.asarray(mask)
    assert values.ndim == 2 and set(np.unique(values)) <= {0, 1}
    assert params["label_names"] == {"background": 0, "lesion": 1}
    truth = np.asarray(Image.open(held_out[0]["label"])) > 0
    assert dice(torch.as_tensor(values > 0), torch.as_tensor(truth)) > 0.6  # the same pixels as the picture

    # the uncertainty map of a picture comes back as a 2D float NIfTI of the same size
    result, params = client.infer("segdiff_uncertainty", image_id, {"output_map": True})
    umap = nib.load(result)
    assert umap.shape == (96, 96) and params["output"] == "uncertainty_map" and params["cached"]

    # a grayscale picture for this RGB model: a clear 4xx, not a 500
    import requests

    gray = tmp_path / "gray.png"
    Image.open(held_out[1]["image"]).convert("L").save(gray)
    with open(gray, "rb") as f:
        r = requests.post(f"{server.url}/infer/segdiff", files={"file": ("gray.png", f, "image/png")},
                          data={"params": "{}"}, timeout=120)
    assert r.status_code == 422, (r.status_code, r.text[:500])
    assert "expects 3 image channel(s), the image has 1" in r.text
