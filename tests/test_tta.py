"""Test-time flips (`monai_segdiff.tta`): which views, exact un-mirroring, and the option through the
config, the `Segmenter`, `segdiff infer` and `segdiff evaluate`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PHANTOMS, app_module

from monai_segdiff.cli import main
from monai_segdiff.config import SegDiffConfig, load_checkpoint, save_checkpoint
from monai_segdiff.segmenter import Segmenter
from monai_segdiff.tta import flip_views, with_flips


def test_views_in_plane_first_and_bounded():
    assert flip_views(2, 1) == [()]
    assert flip_views(2, 4) == [(), (-2,), (-1,), (-2, -1)]
    assert flip_views(3, 8)[:4] == [(), (-3,), (-2,), (-1,)] and flip_views(3, 8)[-1] == (-3, -2, -1)
    with pytest.raises(ValueError, match="tta_flips must be in 1..4 for 2D, got 5"):
        flip_views(2, 5)
    with pytest.raises(ValueError, match="tta_flips must be in 1..4"):
        SegDiffConfig(tta_flips=0)
    assert SegDiffConfig(spatial_dims=3, roi_size=[32, 32, 32], tta_flips=8).tta_flips == 8


def ramp_members(net, batch: torch.Tensor, n: int, generator):
    """Not mirror-symmetric: class 1's probability grows along both in-plane axes; anchor = its square."""
    b, _, h, w = batch.shape
    p1 = (torch.arange(h)[:, None] * w + torch.arange(w)[None, :]).float() / (h * w)
    p = torch.stack([1 - p1, p1]).expand(n, b, 2, h, w)
    return p, p[0] ** 2


def test_views_are_mirrored_back_and_averaged_member_by_member():
    batch = torch.zeros(3, 1, 4, 6)
    same = with_flips(ramp_members, [()])
    assert same is ramp_members  # one identity view: the members function itself
    p, anchor = with_flips(ramp_members, flip_views(2, 2))(None, batch, 5, None)
    ramp, ramp_anchor = ramp_members(None, batch, 5, None)
    assert p.shape == ramp.shape and anchor.shape == ramp_anchor.shape
    # the network saw the batch mirrored along H; its answer is mirrored back before averaging
    assert torch.allclose(p, (ramp + ramp.flip(-2)) / 2)
    assert torch.allclose(anchor, (ramp_anchor + ramp_anchor.flip(-2)) / 2)
    p4, _ = with_flips(ramp_members, flip_views(2, 4))(None, batch, 5, None)
    assert torch.allclose(p4, (ramp + ramp.flip(-2) + ramp.flip(-1) + ramp.flip(-2, -1)) / 4)
    # an answer that does not depend on position (mirror-symmetric) is unchanged
    const = lambda net, x, n, g: (torch.full((n, x.shape[0], 2, *x.shape[2:]), 0.5), None)  # noqa: E731
    p_const, a_const = with_flips(const, flip_views(2, 4))(None, batch, 2, None)
    assert a_const is None and torch.equal(p_const, torch.full((2, 3, 2, 4, 6), 0.5))


@pytest.mark.slow
def test_tta_flips_from_the_model_and_overridden_by_infer_and_evaluate(tiny_model, tmp_path, capsys, one_thread):
    image = PHANTOMS / "phantom_000.nii.gz"
    state, cfg, _ = load_checkpoint(tiny_model)
    flipped_model = tmp_path / "flips.pt"
    save_checkpoint(flipped_model, state, cfg.replace(tta_flips=2))
    plain, stored = Segmenter.from_checkpoint(tiny_model), Segmenter.from_checkpoint(flipped_model)
    assert plain.tta_flips == 1 and stored.tta_flips == 2
    a, b = plain(image), stored(image)
    assert a.stats["tta_flips"] == 1 and b.stats["tta_flips"] == 2
    assert a.label.shape == b.label.shape and not torch.equal(a.ensemble.probs, b.ensemble.probs)
    # the override: the stored model with one view is the plain model, bit for bit
    one = Segmenter.from_checkpoint(flipped_model, tta_flips=1)(image)
    assert torch.equal(one.ensemble.probs, a.ensemble.probs)

    capsys.readouterr()
    assert main(["infer", "--model", str(flipped_model), "--image", str(image), "--output", str(tmp_path / "o"),
                 "--tta-flips", "4", "--quiet"]) == 0
    assert json.loads((tmp_path / "o" / "phantom_000.json").read_text())["tta_flips"] == 4
    assert main(["evaluate", "--model", str(tiny_model), "--studies", str(PHANTOMS), "--report", str(tmp_path / "r"),
                 "--cases", "phantom_000", "--tta-flips", "2", "--no-pictures", "--quiet"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["settings"]["tta_flips"] == 2 and report["cases"][0]["dice"]["organ"] == pytest.approx(
        float(_dice(b.label, PHANTOMS / "labels" / "final" / "phantom_000.nii.gz")), abs=1e-6)
    capsys.readouterr()
    assert main(["infer", "--model", str(tiny_model), "--image", str(image), "--output", str(tmp_path / "bad"),
                 "--tta-flips", "9", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tta_flips must be in 1..4 for 2D, got 9" in err, err


def _dice(label: torch.Tensor, reference) -> float:
    import nibabel as nib
    import numpy as np

    from monai_segdiff.metrics import dice_per_label

    ref = torch.as_tensor(np.asarray(nib.load(reference).dataobj)).long()
    return dice_per_label(label[0].long(), ref, 3)[0]


def test_app_conf_tta_flips(tiny_model, tmp_path, one_thread):
    """`--conf tta_flips`: interactive infer's views (0: the model's); scoring always asks for one."""
    configs = app_module("lib.configs.segdiff")
    ConfError, SegDiffTaskConfig = configs.ConfError, configs.SegDiffTaskConfig
    app = SegDiffTaskConfig()
    app.init("segdiff", str(tmp_path), {"model_path": str(tiny_model), "tta_flips": "4"}, None)
    pred, _ = app.model.predict(str(PHANTOMS / "phantom_000.nii.gz"), samples=2, steps=2)
    assert pred.stats["tta_flips"] == 4
    assert app.model.segmenter(2, 2, tta_flips=1)[0].tta_flips == 1
    default = SegDiffTaskConfig()
    default.init("segdiff", str(tmp_path), {"model_path": str(tiny_model)}, None)
    assert default.model.segmenter(2, 2)[0].tta_flips == 1  # the checkpoint's
    with pytest.raises(ConfError, match="--conf tta_flips must be 0 .* or 1..8, got 9"):
        SegDiffTaskConfig().init("segdiff", str(tmp_path), {"tta_flips": "9"}, None)
