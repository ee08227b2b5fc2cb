"""A real learning test: a small diffusion model trained briefly on phantoms segments held-back
phantoms far better than the same model untrained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from monai_segdiff import data, metrics
from monai_segdiff.networks import build_network
from monai_segdiff.segmenter import Segmenter, load_image
from monai_segdiff.training import new_config, train

PHANTOMS = Path(__file__).resolve().parents[1] / "sample-data" / "phantoms"


def organ_dice(seg: Segmenter, items: list[dict]) -> float:
    scores = []
    for it in items:
        pred = seg(it["image"]).label[0].long()
        scores.append(metrics.dice_per_label(pred, load_image(it["label"])[0].long(), 3)[0])
    return float(np.mean(scores))


def test_short_training_learns_to_segment(tmp_path):
    items = data.labelled(data.datalist(PHANTOMS))
    train_items, held_out = items[:12], items[-3:]
    cfg = new_config(train_items, ["organ", "lesion"], channels=[16, 32, 32], sample_steps=2, num_samples=3)
    torch.manual_seed(0)
    untrained = organ_dice(Segmenter(build_network(cfg), cfg), held_out)
    result = train(cfg, train_items, (), output=tmp_path / "m.pt", epochs=5, iterations_per_epoch=30, batch_size=8)
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    trained = organ_dice(Segmenter.from_checkpoint(tmp_path / "m.pt"), held_out)
    print(f"held-out organ Dice: untrained {untrained:.3f}, trained {trained:.3f}, losses {result.losses}")
    assert trained >= 0.6, trained  # calibrated on this CPU: ~0.65-0.7 after 150 steps
    assert trained >= untrained + 0.3, (untrained, trained)
