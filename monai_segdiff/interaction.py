"""Training with simulated clicks (opt-in per model: ``SegDiffConfig.click_channels``).

DeepEdit's recipe (Diaz-Pinto et al., "DeepEdit: Deep Editable Learning for Interactive Segmentation of
3D Medical Images", MICCAI DALI 2022): the network sees one guidance channel per class; in a share of
the training samples the channels stay empty (the model still auto-segments), in the others they hold
clicks placed where the model's own current prediction is wrong, so the network learns to follow
clicks on the errors it makes. MONAI implements the recipe as ``monai.apps.deepedit`` transforms and an
ignite ``Interaction`` that re-runs the network inside an ignite loop; the project's loop is plain torch
on batches of slices, so the same idea is written here in a few lines, reusing
:func:`monai_segdiff.clicks.next_click` (the benchmark's simulated annotator) to place the clicks.

The model's own prediction is one cheap deterministic pass: a one-step sample for a diffusion network
(its x0 estimate from pure noise, the image path run once), the logits for the baseline UNet.
"""

from __future__ import annotations

import torch
from scipy import ndimage
from torch import nn

from .clicks import Clicks, guidance, next_click
from .config import SegDiffConfig
from .diffusion.sampler import build_sampler

CLICK_SHARE = 0.5  # share of training samples with clicks (DeepEdit trains half without)
MAX_CLICKS = 5  # clicks per sample with clicks: 1..MAX_CLICKS, uniform


@torch.no_grad()
def own_prediction(net: nn.Module, image: torch.Tensor, cfg: SegDiffConfig,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The network's current label map ``[B, *spatial]`` for ``image [B, C', ...]`` without guidance."""
    zeros = image.new_zeros(image.shape[0], cfg.guidance_channels, *image.shape[2:])
    was_training = net.training
    net.eval()
    probs, _ = build_sampler(cfg, steps=1).members_and_anchor(net, torch.cat([image, zeros], 1), 1, generator)
    net.train(was_training)
    return probs[0].argmax(1)


def clicks_on_errors(prediction: torch.Tensor, reference: torch.Tensor, count: int) -> Clicks:
    """Up to ``count`` simulated clicks, each at the centre of the largest error region left once the
    regions clicked before count as corrected."""
    pred, clicks = prediction.clone(), Clicks()
    for _ in range(count):
        click = next_click(pred, reference)
        if click is None:
            break
        value, index = click
        clicks = clicks.add(value, index)
        region = _component(pred != reference, index)  # counts as corrected for the next click
        pred[region] = reference[region]
    return clicks


def _component(mask: torch.Tensor, index: tuple[int, ...]) -> torch.Tensor:
    """The connected component of ``mask`` holding voxel ``index`` (scipy's labelling)."""
    regions = torch.from_numpy(ndimage.label(mask.numpy())[0])
    return regions == regions[index]


def with_simulated_clicks(net: nn.Module, image: torch.Tensor, label: torch.Tensor, cfg: SegDiffConfig,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """``image [B, C', ...]`` with guidance channels appended: zero for a ``1 - CLICK_SHARE`` share of the
    samples, else clicks on the errors of the network's own prediction (``label [B, 1, ...]``)."""
    b = image.shape[0]
    with_clicks = torch.rand(b, generator=generator) < CLICK_SHARE
    counts = torch.randint(1, MAX_CLICKS + 1, (b,), generator=generator)
    channels = torch.zeros(b, cfg.guidance_channels, *image.shape[2:])
    if with_clicks.any():
        idx = torch.nonzero(with_clicks).flatten()
        pred = own_prediction(net, image[idx], cfg, generator).cpu()
        for j, i in enumerate(idx.tolist()):
            clicks = clicks_on_errors(pred[j], label[i, 0].cpu().long(), int(counts[i]))
            channels[i] = guidance(clicks, image.shape[2:], cfg.num_classes, slice_model=False)
    return torch.cat([image, channels.to(image)], 1)
