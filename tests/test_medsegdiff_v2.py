"""MedSegDiff-V2: U-SA (the anchor's learnable Gaussian support and spatial gate) and SS-Former (the
spectrum-space cross-attention at the bottleneck), their wiring into the config, planning and CLI.

Shapes in 2D / 3D through the real sampler, seeded reproducibility and a gradient in every parameter
are covered with the other variants in ``test_networks.py`` (variant ``medsegdiff_v2``); the learning
test is in ``test_learning.py``.
"""

from __future__ import annotations

import pytest
import torch

from monai_segdiff.cli import _extra
from monai_segdiff.config import NETWORKS, SegDiffConfig
from monai_segdiff.diffusion.sampler import DiffusionSampler
from monai_segdiff.networks import build_network
from monai_segdiff.networks.medsegdiff import MedSegDiff
from monai_segdiff.networks.medsegdiff_v2 import MedSegDiffV2, SpectrumSpaceTransformer, UncertainSpatialAttention
from monai_segdiff.transforms import to_onehot_scaled


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(spatial_dims: int = 2, **v2) -> SegDiffConfig:
    return SegDiffConfig(
        labels=["a", "b"], network="medsegdiff_v2", spatial_dims=spatial_dims, channels=[8, 16, 16],
        attention_levels=[False] * 3, norm_num_groups=8, roi_size=[32, 32] if spatial_dims == 2 else [16, 16, 16],
        sample_steps=2, num_samples=3, context=1 if spatial_dims == 2 else 0, extra={"medsegdiff_v2": v2},
    )


def blob(spatial_dims: int, size: int = 16) -> torch.Tensor:
    """One-hot probabilities ``[1, 3, ...]`` of a cube of class 1 holding a smaller cube of class 2."""
    label = torch.zeros((1, 1, *[size] * spatial_dims), dtype=torch.long)
    label[(..., *[slice(4, 12)] * spatial_dims)] = 1
    label[(..., *[slice(6, 9)] * spatial_dims)] = 2
    return (to_onehot_scaled(label, 3) + 1) / 2


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_usa_without_smoothing_is_the_plain_anchor_exactly(spatial_dims):
    usa = UncertainSpatialAttention(spatial_dims, 3, 8, radius=3, sigma=0.0)
    p = torch.softmax(torch.randn(2, 3, *[12] * spatial_dims) * 3, dim=1)
    assert torch.equal(usa.kernel(), torch.eye(7)[3])  # one-hot taps
    assert torch.equal(usa.smooth(p), p)  # bit for bit, not approximately
    with torch.no_grad():
        usa.sigma.fill_(1.5)
    smoothed = usa.smooth(p)
    assert (smoothed >= p).all() and (smoothed - p).abs().max() > 0.05


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_usa_widens_the_support_of_borders_only(spatial_dims):
    """``max(p * k, p)``: class 1 gains support outside its border (and in the lesion's hole) and stays
    1 where it was 1; beyond the kernel's radius nothing changes; a wider sigma reaches further."""
    p = blob(spatial_dims)
    usa = UncertainSpatialAttention(spatial_dims, 3, 8, radius=3, sigma=1.0)
    s = usa.smooth(p)
    line = (0, 1, *[8] * (spatial_dims - 1))  # a line through the cube's centre along the last axis
    assert s[line][3] > 0.2 and p[line][3] == 0  # one voxel outside the border: now supported
    assert s[line][0] == 0  # four voxels out: beyond the radius
    assert (s[p == 1] == 1).all() and torch.equal(s[line][10:12], p[line][10:12])  # the max keeps the anchor
    assert 0.2 < s[line][7] < 1 and p[line][7] == 0  # inside the lesion: class 1 is uncertain there
    with torch.no_grad():
        usa.sigma.fill_(3.0)
    assert usa.smooth(p)[line][2] > s[line][2]


def test_usa_sigma_is_learned_from_the_denoising_loss():
    net = build_network(tiny())
    img = torch.randn(2, 3, 32, 32)
    cond = net.condition(img)
    out = net(torch.randn(2, 3, 32, 32), torch.full((2,), 10), cond)
    out.square().mean().backward()
    assert net.usa.sigma.grad is not None and net.usa.sigma.grad != 0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_v2_with_zero_smoothing_is_conditioned_on_the_plain_anchor(spatial_dims):
    """With sigma 0 the whole network computes exactly what it computes when U-SA's smoothing is
    skipped (the plain anchor of MedSegDiff feeds the mask path and the gate)."""
    cfg = tiny(spatial_dims, usa_sigma=0.0)
    net = build_network(cfg).eval()
    img = torch.randn(2, cfg.in_channels, *cfg.roi_size)
    x_t, t = torch.randn(2, 3, *cfg.roi_size), torch.full((2,), 500)
    with torch.no_grad():
        cond = net.condition(img)
        *_, smoothed, _gate, _tokens, plain = cond
        assert torch.equal(smoothed, plain)
        out = net(x_t, t, cond)
        net.usa.smooth = lambda p: p  # no smoothing at all
        assert torch.equal(net(x_t, t, net.condition(img)), out)
        net.usa.smooth = UncertainSpatialAttention.smooth.__get__(net.usa)
        net.usa.sigma.fill_(2.0)  # with smoothing the prediction moves
        assert (net(x_t, t, net.condition(img)) - out).abs().max() > 1e-4


def test_condition_layout_and_the_anchor_protocol():
    """The V1 protocol: the anchor head's Dice + CE once per training batch, the plain (unsmoothed)
    anchor for the ensemble's fusion; without the anchor, no U-SA and no anchor loss."""
    net = build_network(tiny())
    img = torch.randn(2, 3, 32, 32)
    x0 = to_onehot_scaled(torch.randint(0, 3, (2, 1, 32, 32)), 3)
    cond = net.training_condition(img, x0)
    loss = net.extra_loss()
    assert loss is not None and loss > 0 and net.extra_loss() is None
    *head, smoothed, gate, tokens, plain = cond
    probs = net.anchor_probabilities(cond)
    assert torch.allclose(probs.sum(1), torch.ones(())) and torch.equal(probs, (plain + 1) / 2)
    assert not plain.requires_grad and smoothed.shape == plain.shape == x0.shape
    assert gate.shape[2:] == head[1].shape[2:] == (16, 16)  # U-SA's gate at the first mask level (half size)
    assert tokens.shape == (2, 8 * 8, net.ss_former.blocks[0].mlp.linear1.in_features)  # bottleneck tokens
    off = build_network(tiny(anchor=False))
    assert off.usa is None and off.anchor_probabilities(off.condition(img)) is None
    assert off.training_condition(img, x0) is not None and off.extra_loss() is None
    assert off(torch.randn(2, 3, 32, 32), torch.full((2,), 10), off.condition(img)).shape == x0.shape


def test_ss_former_attends_to_the_image_tokens():
    """The bottleneck output depends on the image tokens (cross-attention) and on the query's spectrum
    (the filter): changing either changes the result; the filters start as the identity."""
    ss = SpectrumSpaceTransformer(2, channels=8, context_channels=16, hidden=16, heads=2, blocks=2).eval()
    h, feats = torch.randn(2, 8, 6, 6), torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        tokens = ss.tokens(feats)
        out = ss(h, tokens)
        assert out.shape == h.shape and torch.allclose(ss.filters[0](h.repeat(1, 2, 1, 1)), h.repeat(1, 2, 1, 1), atol=1e-5)
        assert (ss(h, ss.tokens(torch.randn(2, 16, 6, 6))) - out).abs().max() > 1e-3
        ss.filters[0].weight[..., 0].mul_(0.1)  # damp the query's spectrum
        assert (ss(h, tokens) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="divisible"):
        SpectrumSpaceTransformer(2, 8, 16, hidden=15, heads=2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_v2_with_a_strided_image_path(spatial_dims):
    cfg = tiny(spatial_dims, image_stride=2)
    assert cfg.divisor == 2 * tiny(spatial_dims).divisor
    net = build_network(cfg).eval()
    img = torch.randn(1, cfg.in_channels, *cfg.roi_size)
    probs = DiffusionSampler(cfg).probabilities(net, img, 2, torch.Generator().manual_seed(0))
    assert probs.shape == (2, 1, 3, *cfg.roi_size)


def test_v2_is_wired_in_by_name():
    assert "medsegdiff_v2" in NETWORKS
    net = build_network(tiny())
    assert isinstance(net, MedSegDiffV2) and isinstance(net, MedSegDiff)
    assert _extra({"network": "medsegdiff_v2", "anchor": False}) == {"medsegdiff_v2": {"anchor": False}}
    assert _extra({"network": "medsegdiff", "anchor": True}) == {"medsegdiff": {"anchor": True}}
    with pytest.raises(ValueError, match="ss_blocks"):
        build_network(tiny(ss_blocks=0))
