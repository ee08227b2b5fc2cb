"""Clicks: parsing what 3D Slicer sends, the held neighbourhood, the simulated annotator, click training,
and the Segmenter's interactive path (held voxels kept, zero clicks = plain, seeded runs reproduce, a
click update that reruns only the clicked slices equals a full rerun)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from monai_segdiff.clicks import (REGION_REACH, Clicks, _nearer, click_region, follow_clicks, grow, guidance,
                                  next_click, parse_clicks, reach_per_axis, within_reach)
from monai_segdiff.config import SegDiffConfig
from monai_segdiff.errors import InputError
from monai_segdiff.interaction import clicks_on_errors, with_simulated_clicks
from monai_segdiff.networks import build_network
from monai_segdiff.segmenter import Segmenter

NAMES = {"background": 0, "liver": 1, "lesion": 2}


def test_parse_single_label_mode():
    c = parse_clicks({"label": "Lesion", "foreground": [[1, 2, 3]], "background": [[4, 5, 6]], "slice": 3},
                     NAMES, (10, 10, 10))
    assert c.points == [(2, (1, 2, 3)), (0, (4, 5, 6))]


def test_parse_multi_label_mode():
    # the plugin's multi-label request: one list per label name of /info, and the current segment in "label"
    c = parse_clicks({"liver": [[1, 1, 1]], "lesion": [], "background": [[2, 2, 2]], "label": "liver",
                      "device": "cpu"}, NAMES, (5, 5, 5))
    assert sorted(c.points) == [(0, (2, 2, 2)), (1, (1, 1, 1))]


@pytest.mark.parametrize("params,reason", [
    ({"label": "spleen", "foreground": [[1, 1, 1]]}, "does not segment"),
    ({"label": "liver", "foreground": [[1, 1]]}, "outside"),
    ({"label": "liver", "foreground": [[1, 1, 99]]}, "outside"),
    ({"label": "liver", "foreground": "x"}, "list of voxel indices"),
    ({"label": "liver", "foreground": [[1, "a", 2]]}, "2 or 3 voxel indices"),
])
def test_parse_refuses_bad_clicks(params, reason):
    with pytest.raises(InputError, match=reason):
        parse_clicks(params, NAMES, (5, 5, 5) if "[1, 1]]" not in str(params) else (5, 5, 5))


def test_2d_image_accepts_slicer_third_index_zero():
    c = parse_clicks({"label": "liver", "foreground": [[3, 4, 0]]}, NAMES, (8, 8))
    assert c.points == [(1, (3, 4))]


def test_click_region_slice_model_holds_a_disc_in_the_clicked_slice():
    values, mask = click_region(Clicks([(2, (5, 5, 3))]), (11, 11, 7), 3, slice_model=True, radius=2)
    assert mask[0, ..., 3].sum() == 13  # voxels within 2 of the centre in a plane
    assert mask[0, ..., [0, 1, 2, 4, 5, 6]].sum() == 0
    assert torch.equal(values[:, 5, 5, 3], torch.tensor([-1.0, -1.0, 1.0]))
    assert torch.equal(values[:, 0, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # unheld voxels read as background
    values3, mask3 = click_region(Clicks([(1, (5, 5, 3))]), (11, 11, 7), 3, slice_model=False, radius=1)
    assert mask3.sum() == 7  # a ball of radius 1: the centre and its 6 neighbours


def test_guidance_peaks_at_the_click_per_label():
    g = guidance(Clicks([(1, (4, 4)), (0, (0, 0))]), (9, 9), 3, slice_model=True)
    assert g.shape == (3, 9, 9) and g[1, 4, 4] == 1.0 and g[0, 0, 0] == 1.0 and g[2].sum() == 0
    assert g[1, 4, 6] < g[1, 4, 5] < 1.0


def test_next_click_goes_to_the_centre_of_the_largest_error():
    ref = torch.zeros(20, 20, dtype=torch.long)
    ref[2:5, 2:5] = 1  # a small miss
    ref[8:17, 8:17] = 1  # a large miss: the click goes to its centre
    value, index = next_click(torch.zeros_like(ref), ref)
    assert value == 1 and index == (12, 12)
    fp = torch.zeros_like(ref)
    fp[10:15, 0:5] = 2  # a false positive of label 2 is the only error: a background click inside it
    assert next_click(fp, torch.zeros_like(ref)) == (0, (12, 2))
    assert next_click(ref, ref) is None


def test_clicks_on_errors_visit_each_error_region_once():
    ref = torch.zeros(30, 30, dtype=torch.long)
    ref[2:6, 2:6] = 1
    ref[10:20, 10:20] = 1
    ref[24:27, 24:27] = 1
    clicks = clicks_on_errors(torch.zeros_like(ref), ref, 5)
    assert [p for _, p in clicks.points] == [(14, 14), (3, 3), (25, 25)]  # largest first, then none left


def test_follow_clicks_flips_only_what_the_ensemble_doubted():
    # a sure organ (p = 1) with a doubtful bulge attached (p = 0.6), and a missed doubtful blob (p = 0.3)
    p1 = torch.zeros(20, 20, 5)
    p1[2:10, 2:10, 1:4] = 1.0
    p1[10:13, 4:8, 1:4] = 0.6
    p1[14:18, 14:18, 2] = 0.3
    probs = torch.stack([1 - p1, p1])
    label = (p1 > 0.5).long()
    # a background click in the bulge removes the bulge, not the sure organ it touches
    out, out_p = follow_clicks(label, probs, probs, Clicks([(0, (11, 5, 2))]))
    assert not out[10:13, 4:8, 1:4].any() and out[2:10, 2:10, 1:4].all()
    assert torch.equal(out_p[:, 11, 5, 2], torch.tensor([1.0, 0.0]))
    # a foreground click on the missed blob adds the blob (all of it, and nothing the members never drew)
    out, _ = follow_clicks(label, probs, probs, Clicks([(1, (15, 15, 2))]))
    assert out[14:18, 14:18, 2].all() and int(out.sum()) == int(label.sum()) + 16
    # a background click on the sure organ flips only the clicked voxel; a click that agrees changes nothing
    out, _ = follow_clicks(label, probs, probs, Clicks([(0, (5, 5, 2))]))
    assert int((out != label).sum()) == 1
    assert torch.equal(follow_clicks(label, probs, probs, Clicks([(1, (5, 5, 2))]))[0], label)


def test_a_click_where_no_member_drew_anything_grows_by_image_similarity():
    g = torch.Generator().manual_seed(0)
    image = 0.05 * torch.randn(30, 30, 5, generator=g)
    image[8:16, 8:16, :] += 1.0  # a bright structure every member missed
    image[20:24, 20:24, :] += 1.0  # another one, not connected to it
    label = torch.zeros(30, 30, 5, dtype=torch.long)
    probs = torch.stack([torch.ones(30, 30, 5), torch.zeros(30, 30, 5)])
    assert grow(image[..., 2].numpy(), (10, 10)).sum() == 64
    held = torch.zeros(30, 30, 5, dtype=torch.bool)
    held[11, 11, 2] = True
    out, _ = follow_clicks(label, probs, probs, Clicks([(1, (11, 11, 2))]), held=held, image=image)
    structure = torch.zeros(30, 30, 5, dtype=torch.bool)
    structure[8:16, 8:16, :] = True
    assert out[structure].float().mean() > 0.95 and not out[~structure].any()  # the structure in 3D, nothing else
    assert torch.equal(follow_clicks(label, probs, probs, Clicks([(1, (11, 11, 2))]), image=image)[0], out)  # held: none
    # without the image (or when members drew a region) nothing is grown
    assert int(follow_clicks(label, probs, probs, Clicks([(1, (11, 11, 2))]), held=held)[0].sum()) == 1


def test_clicks_of_different_labels_decide_only_the_voxels_nearer_to_them(monkeypatch):
    # a structure no member drew: a foreground click grows it, a background click (the annotator: "this
    # part is not it") 8 voxels away; each decides only the voxels nearer to it, in either order
    g = torch.Generator().manual_seed(0)
    image = 0.05 * torch.randn(30, 30, 5, generator=g)
    image[6:26, 6:26, :] += 1.0
    label = torch.zeros(30, 30, 5, dtype=torch.long)
    probs = torch.stack([torch.ones(30, 30, 5), torch.zeros(30, 30, 5)])
    fg, bg = (1, (12, 12, 2)), (0, (20, 20, 2))
    held = torch.zeros(30, 30, 5, dtype=torch.bool)
    held[12, 12, 2] = held[20, 20, 2] = True
    out, _ = follow_clicks(label, probs, probs, Clicks([fg, bg]), held=held, image=image)
    x, y = torch.meshgrid(torch.arange(30), torch.arange(30), indexing="ij")
    near_fg = ((x + y) < 32)[..., None].expand(30, 30, 5)  # nearer to (12, 12) than to (20, 20)
    grown = torch.zeros(30, 30, 5, dtype=torch.bool)
    grown[6:23, 6:23, :] = True  # the structure within the foreground click's reach
    assert out[grown & near_fg].float().mean() > 0.95  # the foreground click's part stays
    assert not out[~near_fg].any()  # the background click's part is background
    assert torch.equal(follow_clicks(label, probs, probs, Clicks([bg, fg]), held=held, image=image)[0], out)
    monkeypatch.setattr("monai_segdiff.clicks.NEAREST", False)
    undone, _ = follow_clicks(label, probs, probs, Clicks([fg, bg]), held=held, image=image)
    both = torch.zeros_like(grown)
    both[10:23, 10:23, :] = True  # within both clicks' reach
    assert out[grown & near_fg & both].float().mean() > 0.95
    assert undone[grown & near_fg & both].float().mean() < 0.05  # without the rule the later click takes it back


def test_reach_and_nearer_click_are_in_mm_on_an_anisotropic_grid(monkeypatch):
    # clicks.PHYSICAL (off as shipped, by the measured rule; benchmarks/click_rules.py runs it): a false
    # positive the members doubted (p = 0.6), a tube along the fine axis (2 mm slices on a 3 mm grid, as the
    # real CT's working grid), 26 slices long; a background click in its middle
    p1 = torch.zeros(12, 12, 40)
    p1[4:8, 4:8, 7:33] = 0.6
    probs = torch.stack([1 - p1, p1])
    label = (p1 > 0.5).long()
    click = Clicks([(0, (5, 5, 20))])
    # counted in voxels (shipped), the click reaches 10 slices and the tube's ends stay
    assert reach_per_axis(10, (3.0, 3.0, 2.0)) == 10
    voxels, _ = follow_clicks(label, probs, probs, click, spacing=(3.0, 3.0, 2.0))
    assert torch.equal(voxels, follow_clicks(label, probs, probs, click)[0])
    assert voxels[4:8, 4:8, 7:10].all() and not voxels[..., 10:31].any() and voxels[4:8, 4:8, 31:33].all()
    monkeypatch.setattr("monai_segdiff.clicks.PHYSICAL", True)
    assert reach_per_axis(10, (3.0, 3.0, 2.0)) == (10, 10, 15) and reach_per_axis(10, (1.0, 1.0, 1.0)) == (10, 10, 10)
    out, _ = follow_clicks(label, probs, probs, click, spacing=(3.0, 3.0, 2.0))
    assert not out.any()  # 13 slices either side: 26 mm, within 30 mm (10 voxels of 3 mm)
    near = within_reach(click, label.shape, spacing=(3.0, 3.0, 2.0))
    assert near[5, 5, 5] and not near[5, 5, 4]  # 15 slices of 2 mm
    # the nearer click, in mm: a foreground click 3 voxels (9 mm) across and a background click 4 slices (8 mm)
    # along; the voxel between them is the background click's in mm, the foreground click's in voxels
    two = Clicks([(1, (2, 2, 20)), (0, (5, 2, 24))])
    assert not bool(_nearer((slice(5, 6), slice(2, 3), slice(20, 21)), (2, 2, 20), 1, two, (3.0, 3.0, 2.0)).any())
    assert bool(_nearer((slice(5, 6), slice(2, 3), slice(20, 21)), (2, 2, 20), 1, two).all())


def test_a_click_in_a_small_blob_of_the_plain_answer_flips_the_whole_blob():
    # the plain answer: a sure false-positive blob over 3 slices, and a sure organ larger than the reach
    plain = torch.zeros(40, 40, 8, dtype=torch.long)
    plain[5:9, 5:9, 2:5] = 1
    plain[15:40, 10:30, :] = 1
    sure = torch.nn.functional.one_hot(plain, 2).movedim(-1, 0).float()  # every member agreed: no doubt to follow
    held = torch.zeros(40, 40, 8, dtype=torch.bool)
    held[6, 6, 3] = True
    label = plain.clone()
    label[6, 6, 3] = 0  # the clicked voxel, already held
    out, out_p = follow_clicks(label, sure, sure, Clicks([(0, (6, 6, 3))]), held=held, plain=plain)
    assert not out[5:9, 5:9, 2:5].any()  # the whole blob, in every slice
    assert torch.equal(out[15:, 10:30], plain[15:, 10:30]) and float(out_p[1, 5:9, 5:9, 2:5].max()) == 0.0
    # a click inside the organ (it reaches beyond the click's reach) flips only what it holds
    label = plain.clone()
    label[25, 20, 4] = 0
    out, _ = follow_clicks(label, sure, sure, Clicks([(0, (25, 20, 4))]), plain=plain)
    assert int((out != plain).sum()) == 1
    # without the plain answer the sure blob stays (only the clicked voxel changes)
    out, _ = follow_clicks(plain.clone(), sure, sure, Clicks([(0, (6, 6, 3))]))
    assert int((out != plain).sum()) == 1
    # a voxel another click holds as foreground is never flipped by the background click's blob
    held[5, 5, 2] = True
    out, _ = follow_clicks(plain.clone(), sure, sure, Clicks([(0, (6, 6, 3))]), held=held, plain=plain)
    assert out[5, 5, 2] == 1 and int(out[5:9, 5:9, 2:5].sum()) == 1


def test_a_background_click_splits_an_attached_false_positive_along_the_image_edge():
    """The plain answer: a bright organ plus a rim of dark tissue attached to it (no blob: the rim touches
    a structure larger than the reach); the members doubted only a small patch of the rim around the click
    (so that patch is what the ensemble's rule removes, and nothing is grown). A background click in the
    rim takes the dark part the rim holds, and none of the bright organ (the rule is off by default)."""
    g = torch.Generator().manual_seed(0)
    image = 0.05 * torch.randn(40, 40, 6, generator=g)
    image[10:30, 10:30, :] += 1.0  # the organ
    plain = torch.zeros(40, 40, 6, dtype=torch.long)
    plain[10:30, 10:30, :] = 1
    plain[30:34, 12:28, 1:5] = 1  # a false-positive rim on dark tissue, attached to the organ
    sure = torch.nn.functional.one_hot(plain, 2).movedim(-1, 0).float()
    sure[:, 31:34, 18:23, 2:5] = torch.tensor([0.4, 0.6])[:, None, None, None]  # the members' doubt
    held = torch.zeros(40, 40, 6, dtype=torch.bool)
    held[31:34, 19:22, 3] = True  # the clicked neighbourhood, held as background
    label = plain.clone()
    label[held] = 0
    click = Clicks([(0, (32, 20, 3))])
    out, out_p = follow_clicks(label, sure, sure, click, held=held, image=image, plain=plain, split_attached=True)
    rim = torch.zeros_like(plain, dtype=torch.bool)
    rim[30:34, 12:28, 1:5] = True
    reach = torch.zeros_like(rim)
    reach[22:40, 10:31, :] = True  # within 10 voxels of the click
    assert out[rim & reach].float().mean() < 0.05  # the rim within reach is gone, in every slice (but noise outliers)
    assert torch.equal(out[10:30, 10:30], plain[10:30, 10:30])  # the organ is untouched
    assert torch.equal(out_p[1][rim & reach] == 0, out[rim & reach] == 0)
    off, _ = follow_clicks(label, sure, sure, click, held=held, image=image, plain=plain, split_attached=False)
    assert int(off[rim].sum()) == int(rim.sum()) - 3 * 5 * 3  # without the rule: only the doubted patch
    near, _ = follow_clicks(label, sure, sure, click, held=held, image=image, plain=plain, split_attached=True,
                            split_reach=5)
    assert near[30:34, 12:14, 1:5].all() and near[30:34, 26:28, 1:5].all()  # beyond a reach of 5: kept
    assert near[30:34, 15:26, 1:5].float().mean() < 0.05
    # without the plain answer (no Auto Segmentation to compare with) nothing is split; on by default (measured)
    assert torch.equal(follow_clicks(label, sure, sure, click, held=held, image=image, split_attached=True)[0], off)
    assert torch.equal(follow_clicks(label, sure, sure, click, held=held, image=image, plain=plain)[0], out)
    # a rim as bright as the organ (the image cannot tell them apart): the clicked tissue would take the
    # organ within reach, more than SPLIT_MAX_SHARE of it, so nothing is split
    bright = image.clone()
    bright[30:34, 12:28, 1:5] += 1.0
    same, _ = follow_clicks(label, sure, sure, click, held=held, image=bright, plain=plain, split_attached=True)
    assert torch.equal(same, off)


def _tiny(network: str = "medsegdiff", click_channels: bool = False) -> tuple[torch.nn.Module, SegDiffConfig]:
    cfg = SegDiffConfig(labels=["a", "b"], network=network, channels=[16, 16, 32], norm_num_groups=8,
                        attention_levels=[False] * 3,
                        roi_size=[16, 16], num_samples=2, sample_steps=2, spacing=[-1, -1, -1],
                        click_channels=click_channels)
    torch.manual_seed(0)
    return build_network(cfg).eval(), cfg


def _image() -> MetaTensor:
    g = torch.Generator().manual_seed(1)
    return MetaTensor(torch.rand(1, 24, 20, 9, generator=g), affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))


@pytest.mark.parametrize("network", ["medsegdiff", "unet"])
def test_segmenter_clicks(network):
    net, cfg = _tiny(network)
    # two slices per batch: batches get reused; clicks hold their neighbourhood only (follow_clicks is
    # tested on its own above: it may reach other slices by design)
    seg = Segmenter(net, cfg, max_batch_pixels=2 * 24 * 20 * 2, follow=False)
    img = _image()
    plain = seg(img)
    assert torch.equal(seg(img, clicks=Clicks()).label, plain.label)  # zero clicks = plain infer
    clicks = Clicks([(2, (3, 4, 5)), (0, (10, 10, 2)), (1, (20, 15, 5))])
    full = seg(img, clicks=clicks)
    again = seg(img, clicks=clicks)
    assert torch.equal(full.label, again.label) and torch.equal(full.uncertainty, again.uncertainty)  # seeded
    for value, p in clicks.points:  # clicked voxels carry their label, and every member agrees there
        assert int(full.label[(0, *p)]) == value
        assert float(full.uncertainty[(0, *p)]) == pytest.approx(0.0, abs=1e-5)
    # the update that reuses the plain ensemble reruns only the clicked slices' batches, and equals a rerun
    update = seg(None, clicks=clicks, previous=plain)
    if network != "unet":  # (MC-dropout masks are drawn per batch: a baseline's update is another draw)
        assert torch.equal(update.label, full.label)
        assert torch.allclose(update.ensemble.probs, full.ensemble.probs, atol=1e-5)
    for value, p in clicks.points:
        assert int(update.label[(0, *p)]) == value
    untouched = [z for z in range(9) if z not in (2, 5)]
    assert torch.equal(update.label[..., untouched], plain.label[..., untouched])
    assert update.stats["interaction"] == {"clicks": 3, "held_voxels": 39, "recomputed_slices": 2}


def test_clean_up_in_3d_leaves_slices_without_clicks_alone():
    net, cfg = _tiny()
    seg = Segmenter(net, cfg, postprocess="median,confident_component,fill_holes", follow=False)
    img = _image()
    plain = seg(img)
    clicks = Clicks([(1, (12, 10, 4)), (2, (5, 5, 4))])
    update = seg(None, clicks=clicks, previous=plain)
    others = [z for z in range(9) if z != 4]
    assert torch.equal(update.label[..., others], plain.label[..., others])
    assert int(update.label[0, 12, 10, 4]) == 1 and int(update.label[0, 5, 5, 4]) == 2


def test_a_click_changes_nothing_beyond_its_reach(monkeypatch):
    net, cfg = _tiny()
    seg = Segmenter(net, cfg)
    g = torch.Generator().manual_seed(2)
    img = MetaTensor(torch.rand(1, 48, 40, 9, generator=g), affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))
    plain = seg(img)
    clicks = Clicks([(1, (4, 4, 4))])
    far = torch.ones(48, 40, 9, dtype=torch.bool)
    far[: 4 + REGION_REACH + 1, : 4 + REGION_REACH + 1] = False
    update = seg(None, clicks=clicks, previous=plain)
    assert int(update.label[0, 4, 4, 4]) == 1
    assert torch.equal(update.label[0][far], plain.label[0][far])
    assert torch.equal(update.fused[:, far], plain.fused[:, far])  # (working grid = input grid here)
    # without the rule the resampled slice differs beyond the reach (the network sees the whole slice)
    monkeypatch.setattr("monai_segdiff.segmenter.within_reach",
                        lambda c, shape, spacing: torch.ones(shape, dtype=torch.bool))
    loose = seg(None, clicks=clicks, previous=plain)
    assert not torch.equal(loose.fused[:, far], plain.fused[:, far])


def test_segmenter_holds_known_label_voxels():
    net, cfg = _tiny()
    seg = Segmenter(net, cfg)
    img = _image()
    plain = seg(img)
    label = torch.zeros(1, 24, 20, 9, dtype=torch.long)
    label[0, 5:15, 5:12, 3] = 2
    mask = torch.zeros_like(label, dtype=torch.bool)
    mask[..., 3] = True  # slice 3 corrected: every voxel of it is final, background included
    out = seg(None, known=(label, mask), previous=plain)
    assert torch.equal(out.label[..., 3].long(), label[..., 3])
    assert float(out.uncertainty[..., 3].max()) == pytest.approx(0.0, abs=1e-5)
    assert torch.equal(out.label[..., :3], plain.label[..., :3])


def test_click_channels_network_trains_with_simulated_clicks():
    net, cfg = _tiny(click_channels=True)
    assert cfg.guidance_channels == 3 and cfg.network_channels == cfg.in_channels + 3
    image = torch.rand(4, cfg.in_channels, 16, 16)
    label = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    label[:, :, 4:12, 4:12] = 1
    out = with_simulated_clicks(net, image, label, cfg, torch.Generator().manual_seed(0))
    assert out.shape == (4, cfg.in_channels + 3, 16, 16)
    assert torch.equal(out[:, : cfg.in_channels], image)
    guided = out[:, cfg.in_channels:].flatten(1).amax(1) > 0
    assert 0 < int(guided.sum()) < 4  # some samples with clicks (on errors), some without (auto mode)
    # the Segmenter serves it with zero guidance without clicks, and with guidance after a click
    seg = Segmenter(net, cfg)
    img = _image()
    plain = seg(img)
    assert seg(None, clicks=Clicks([(1, (12, 10, 4))]), previous=plain).stats["interaction"]["clicks"] == 1
