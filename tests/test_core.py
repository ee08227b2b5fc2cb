"""Unit tests of the core: config and checkpoints, transforms, networks, sampler, inferer, segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_segdiff.config import SegDiffConfig, load_checkpoint, save_checkpoint
from monai_segdiff.diffusion.inferer import SegDiffInferer, context_slices
from monai_segdiff.diffusion.objective import DiffusionObjective
from monai_segdiff.diffusion.sampler import DiffusionSampler, trailing_timesteps
from monai_segdiff.errors import CheckpointError, InputError
from monai_segdiff.networks import build_network
from monai_segdiff.networks.medsegdiff import FFParser
from monai_segdiff.segmenter import Segmenter
from monai_segdiff.transforms import from_onehot_scaled, to_onehot_scaled


def tiny(network: str = "medsegdiff", spatial_dims: int = 2, **kw) -> SegDiffConfig:
    args = dict(
        labels=["a", "b"], network=network, spatial_dims=spatial_dims, channels=[8, 16, 16],
        attention_levels=[False] * 3, norm_num_groups=8, roi_size=[32, 32] if spatial_dims == 2 else [16, 16, 16],
        sample_steps=2, num_samples=3, context=1 if spatial_dims == 2 else 0,
    )
    return SegDiffConfig(**{**args, **kw})


def test_config_round_trip_and_checkpoint(tmp_path):
    cfg = tiny()
    assert SegDiffConfig.from_dict(cfg.to_dict()) == cfg
    net = build_network(cfg)
    path = save_checkpoint(tmp_path / "m.pt", net.state_dict(), cfg)
    payload = torch.load(path, weights_only=True)
    assert set(payload) >= {"model", "config"}
    state, cfg2, _ = load_checkpoint(path)
    assert cfg2 == cfg and state.keys() == net.state_dict().keys()


@pytest.mark.parametrize(
    "change", [{"network": "nope"}, {"channels": [10, 16, 16]}, {"sample_steps": 0}, {"num_samples": 0}, {"roi_size": [30, 30]},
              {"anchor_share": 1.5}]
)
def test_config_rejects_bad_values(change):
    with pytest.raises(ValueError):
        tiny(**change)


def test_foreign_and_corrupt_checkpoints(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a checkpoint")
    for name in ("foreign.pt", "corrupt.pt", "missing.pt"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)


def test_onehot_scaling_round_trip():
    label = torch.randint(0, 3, (2, 1, 5, 6))
    x = to_onehot_scaled(label, 3)
    assert x.shape == (2, 3, 5, 6) and set(x.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(from_onehot_scaled(x), label)


def test_context_slices_neighbours_and_edges():
    vol = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 2, 2, 4)
    out = context_slices(vol, 1)
    assert out.shape == (4, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [0, 0, 1] and out[3, :, 0, 0].tolist() == [2, 3, 3]


def test_trailing_timesteps_start_from_noise():
    assert trailing_timesteps(1000, 4) == [999, 749, 499, 249]


@pytest.mark.parametrize("network", ["concat", "medsegdiff", "unet"])
def test_sampler_seeded_reproducible(network):
    cfg = tiny(network)
    net = build_network(cfg).eval()
    img = torch.randn(2, cfg.in_channels, 32, 32)
    from monai_segdiff.diffusion.sampler import build_sampler

    s = build_sampler(cfg)
    a = s.probabilities(net, img, 3, torch.Generator().manual_seed(1))
    b = s.probabilities(net, img, 3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 2, 3, 32, 32)
    assert torch.equal(a, b)
    assert torch.allclose(a.sum(2), torch.ones(()), atol=1e-4)


def test_shared_image_features_equal_recomputed():
    """The fast path (image path once, reused by every member and step) gives the same output as
    recomputing the condition for every member."""
    cfg = tiny("medsegdiff")
    net = build_network(cfg).eval()
    img = torch.randn(2, cfg.in_channels, 32, 32)
    x = torch.randn(6, cfg.num_classes, 32, 32)
    t = torch.full((6,), 500)
    from monai_segdiff.diffusion.sampler import repeat_members

    with torch.inference_mode():
        shared = net(x, t, repeat_members(net.condition(img), 3))
        recomputed = net(x, t, net.condition(img.repeat(3, 1, 1, 1)))
    assert torch.allclose(shared, recomputed, atol=1e-5)


def test_batched_members_equal_one_at_a_time():
    """The fast path (N members in one batch through every step) gives each member the same mask
    as running that member alone from the same initial noise (the seeds' one-after-another loop)."""
    from monai_segdiff.diffusion.sampler import DiffusionSampler

    cfg = tiny("medsegdiff")
    net = build_network(cfg).eval()
    img = torch.randn(2, cfg.in_channels, 32, 32)
    noise = torch.randn(3 * 2, cfg.num_classes, 32, 32, generator=torch.Generator().manual_seed(0))
    sampler = DiffusionSampler(cfg, steps=3)
    batched = sampler.sample(net, img, 3, noise=noise)
    alone = torch.stack([sampler.sample(net, img, 1, noise=noise[2 * m: 2 * m + 2])[0] for m in range(3)])
    assert batched.shape == alone.shape == (3, 2, cfg.num_classes, 32, 32)
    assert torch.allclose(batched, alone, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)  # members do differ


def test_slice_batch_bound_keeps_the_segmentation():
    """Bounding the voxels per network call (memory for CT-sized volumes) splits the slices into more
    batches; with a deterministic predictor (the UNet, one pass, no dropout) the output is unchanged,
    so slices, their context channels and padding are assembled the same way in every batch."""
    from monai_segdiff.diffusion.inferer import SegDiffInferer
    from monai_segdiff.diffusion.sampler import MCDropoutSampler

    cfg = tiny("unet")
    net = build_network(cfg).eval()
    vol = torch.randn(1, 30, 28, 9)
    sampler = MCDropoutSampler(cfg)
    big = SegDiffInferer(sampler.probabilities, 1, cfg.num_classes, 2, cfg.context, cfg.divisor)(vol, net)
    small = SegDiffInferer(sampler.probabilities, 1, cfg.num_classes, 2, cfg.context, cfg.divisor,
                           max_batch_pixels=2 * 32 * 32)(vol, net)
    assert torch.allclose(big.probs, small.probs, atol=1e-5)
    assert big.probs.shape == (cfg.num_classes, 30, 28, 9)


def test_slabwise_resampling_equals_whole():
    """Resampling to the input grid one slab at a time (bounded memory on CT-sized volumes) gives
    the same result as one call over the whole grid, for an oblique, flipped, anisotropic target."""
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    from monai_segdiff.transforms import destination_slabs

    src = MetaTensor(torch.rand(3, 20, 18, 12), affine=torch.diag(torch.tensor([1.5, 1.5, 2.5, 1.0])).double())
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    aff = torch.eye(4, dtype=torch.float64)
    aff[:3, :3] = rot @ torch.diag(torch.tensor([0.9, 1.1, 1.7], dtype=torch.float64))
    aff[:3, 3] = torch.tensor([25.0, -3.0, 20.0])
    dst = MetaTensor(torch.empty(1, 31, 27, 17), affine=aff)
    resample = ResampleToMatch(mode="bilinear", padding_mode="border")
    whole = resample(src, img_dst=dst).as_tensor()
    out = torch.zeros_like(whole)
    slabs = list(destination_slabs(dst.shape[1:], dst.affine, max_voxels=31 * 27 * 4))
    assert len(slabs) == 5
    for z, slab in slabs:
        out[..., z] = resample(src, img_dst=slab).as_tensor()
    assert torch.allclose(out, whole, atol=1e-5)


def test_slabwise_spacing_equals_spacingd():
    """Preprocessing resamples large volumes to the working spacing one slab at a time (bounded
    memory); image (bilinear) and label (nearest) equal MONAI's Spacingd, values and affine."""
    from monai.data import MetaTensor
    from monai.transforms import Spacingd

    from monai_segdiff.transforms import SlabSpacingd

    aff = torch.eye(4, dtype=torch.float64)
    aff[:3, :3] = torch.diag(torch.tensor([0.7, 0.8, 2.5], dtype=torch.float64))
    aff[:3, 3] = torch.tensor([5.0, -3.0, 10.0])
    data = {"image": MetaTensor(torch.rand(2, 40, 36, 20), affine=aff),
            "label": MetaTensor((torch.rand(1, 40, 36, 20) * 3).floor(), affine=aff)}
    kw = {"pixdim": [1.0, 1.0, 1.3], "mode": ["bilinear", "nearest"]}
    ref = Spacingd(["image", "label"], **kw)(dict(data))
    slabbed = SlabSpacingd(["image", "label"], max_voxels=28 * 29 * 3, **kw)(dict(data))
    for key in ("image", "label"):
        assert slabbed[key].shape == ref[key].shape == (data[key].shape[0], 28, 29, 38)
        assert torch.allclose(slabbed[key].as_tensor(), ref[key].as_tensor(), atol=1e-5)
        assert torch.allclose(slabbed[key].affine, ref[key].affine)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ff_parser_identity_at_init(spatial_dims):
    ff = FFParser(spatial_dims, 4, size=8)
    x = torch.randn(2, 4, *([12] * spatial_dims))
    assert torch.allclose(ff(x), x, atol=1e-5)


@pytest.mark.parametrize("network", ["concat", "medsegdiff"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_every_parameter_gets_a_gradient(network, spatial_dims):
    cfg = tiny(network, spatial_dims)
    net = build_network(cfg)
    shape = cfg.roi_size
    img = torch.randn(2, cfg.in_channels, *shape)
    mask = to_onehot_scaled(torch.randint(0, 3, (2, 1, *shape)), 3)
    objective = DiffusionObjective(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(4):  # MONAI zero-initialises output layers: let them move first
        opt.zero_grad()
        loss, logs = objective(net, img, mask)
        loss.backward()
        opt.step()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing
    assert np.isfinite(logs["loss"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_inferer_output_shapes(spatial_dims):
    cfg = tiny("medsegdiff", spatial_dims)
    net = build_network(cfg).eval()
    sampler = DiffusionSampler(cfg)
    vol = torch.randn(1, 20, 18, 7)  # odd sizes: padded inside, cropped back
    inferer = SegDiffInferer(
        sampler.probabilities, 3, 3, spatial_dims, cfg.context, cfg.divisor, max_batch_pixels=3 * 20 * 18 * 2,
        roi_size=[16, 16, 8] if spatial_dims == 3 else None,
    )
    out = inferer(vol, net)
    assert out.probs.shape == (3, 20, 18, 7)
    assert out.samples.shape == (3, 20, 18, 7) and out.samples.dtype == torch.uint8
    assert out.expected_entropy.shape == (20, 18, 7)
    assert torch.allclose(out.probs.sum(0), torch.ones(()), atol=1e-4)
    again = inferer(vol, net)
    assert torch.equal(out.samples, again.samples)


def test_segmenter_returns_input_grid(tmp_path):
    """A flipped, anisotropic volume comes back on its own grid and affine."""
    cfg = tiny("medsegdiff", spacing=[1.5, 1.5, -1.0])
    net = build_network(cfg)
    affine = torch.tensor([[-0.9, 0, 0, 10.0], [0, -1.1, 0, -5.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]], dtype=torch.float64)
    img = MetaTensor(torch.rand(1, 37, 29, 6) * 1000, affine=affine)
    pred = Segmenter(net, cfg, num_samples=2, steps=1)(img)
    assert pred.label.shape == (1, 37, 29, 6) and pred.uncertainty.shape == (1, 37, 29, 6)
    assert torch.allclose(pred.label.affine.double(), affine)
    assert set(pred.stats["labels"]) == {"a", "b"}
    assert 0.0 <= float(pred.uncertainty.min()) and float(pred.uncertainty.max()) <= 1.0


def test_segmenter_rejects_bad_images():
    cfg = tiny("medsegdiff")
    seg = Segmenter(build_network(cfg), cfg, num_samples=1, steps=1)
    with pytest.raises(InputError, match="channel"):
        seg(MetaTensor(torch.rand(2, 8, 8, 4)))
    with pytest.raises(InputError, match="spatial"):
        seg(MetaTensor(torch.rand(1, 8, 8, 4, 2)))
    with pytest.raises(InputError, match="finite"):
        seg(MetaTensor(torch.full((1, 8, 8, 4), float("nan"))))
