"""monai_segdiff.diffusion.sampler: voxels the annotator fixed are held at every sampling step (the
training-free conditioning of interactive correction); an empty set of held voxels changes nothing."""

from __future__ import annotations

import torch
from conftest import tiny_config

from monai_segdiff.diffusion.sampler import DiffusionSampler
from monai_segdiff.networks import build_network


def setup():
    torch.manual_seed(0)
    cfg = tiny_config()
    net = build_network(cfg).eval()
    image = torch.randn(1, cfg.in_channels, 64, 64)
    values = -torch.ones(1, cfg.num_classes, 64, 64)
    values[:, 1] = 1  # the annotator says: label 1 here
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[..., 20:30, 10:40] = True
    return cfg, net, image, values, mask


class Recorder(torch.nn.Module):
    """The network, remembering the noisy mask it is given at every step."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def condition(self, image):
        return self.net.condition(image)

    def forward(self, x, t, cond):
        self.inputs.append(x.clone())
        return self.net(x, t, cond)


def test_no_held_voxel_is_the_plain_sampler_and_runs_reproduce():
    cfg, net, image, values, mask = setup()
    sampler = DiffusionSampler(cfg, steps=3)
    plain = sampler.sample(net, image, 2, torch.Generator().manual_seed(1))
    empty = sampler.sample(net, image, 2, torch.Generator().manual_seed(1), known=(values, torch.zeros_like(mask)))
    assert torch.equal(plain, empty)
    again = sampler.sample(net, image, 2, torch.Generator().manual_seed(1), known=(values, mask))
    once = sampler.sample(net, image, 2, torch.Generator().manual_seed(1), known=(values, mask))
    assert torch.equal(again, once) and not torch.equal(again, plain)


def test_held_voxels_are_kept_at_every_step_and_in_the_result():
    cfg, net, image, values, mask = setup()
    sampler = DiffusionSampler(cfg, steps=4)
    recorder = Recorder(net)
    noise = torch.randn(2, cfg.num_classes, 64, 64, generator=torch.Generator().manual_seed(2))
    x0 = sampler.sample(recorder, image, 2, noise=noise, known=(values, mask))
    held = mask.expand(2, cfg.num_classes, 64, 64)
    assert torch.equal(x0.reshape(2, cfg.num_classes, 64, 64)[held], values.expand(2, -1, -1, -1)[held])
    timesteps = sampler.scheduler.timesteps.tolist()
    assert len(recorder.inputs) == len(timesteps)
    assert torch.equal(recorder.inputs[0], noise)  # the first step sees the initial noise everywhere
    for x, t in zip(recorder.inputs[1:], timesteps[1:]):  # each later step: the known mask noised to t
        a = float(sampler.scheduler.alphas_cumprod[t])
        expected = a**0.5 * values.expand(2, -1, -1, -1) + (1 - a) ** 0.5 * noise
        torch.testing.assert_close(x[held], expected[held])
        assert not torch.allclose(x[~held], expected[~held])  # elsewhere the model's own sample
