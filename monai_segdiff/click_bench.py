"""The interaction benchmark: a simulated annotator corrects each case with clicks, one at a time.

Each click goes to the centre of the largest region where the current answer is wrong, labelled as the
reference says (:func:`monai_segdiff.clicks.next_click`); every request carries all clicks so far and
reuses the case's plain (click-free) ensemble, as the app does. Reported per model: Dice after 0, 1, 3,
5, 10 clicks, NoC@85 / NoC@90 (clicks needed to reach that Dice, capped at ``max_clicks``: a case that
never reaches it counts as the cap), seconds of the plain segmentation and of one click update.
Dice: per case, averaged over the labels present in the reference or the answer
(:func:`monai_segdiff.training.pooled_dice` on one case).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .clicks import Clicks, next_click
from .io import load_image, load_label
from .segmenter import Segmenter
from .training import pooled_dice

REPORT_AT = (0, 1, 3, 5, 10)
MAX_CLICKS = 20


def click_curve(segmenter: Segmenter, image, reference: torch.Tensor, max_clicks: int = MAX_CLICKS) -> dict:
    """Dice after 0..``max_clicks`` clicks on one case (``reference [*spatial]`` on the image's grid)."""
    k = segmenter.cfg.num_classes
    ref = torch.as_tensor(reference).long()
    t0 = time.perf_counter()
    plain = segmenter(image)
    plain_s = time.perf_counter() - t0
    answer, clicks, dice, click_s = plain, Clicks(), [], []
    dice.append(_dice(answer.label[0], ref, k))
    for _ in range(max_clicks):
        click = next_click(answer.label[0], ref)
        if click is None:  # perfect: every further click changes nothing
            dice += [dice[-1]] * (max_clicks + 1 - len(dice))
            break
        clicks = clicks.add(*click)
        t0 = time.perf_counter()
        answer = segmenter(None, clicks=clicks, previous=plain)
        click_s.append(time.perf_counter() - t0)
        dice.append(_dice(answer.label[0], ref, k))
    return {"dice": dice, "plain_s": plain_s, "click_s": float(np.median(click_s)) if click_s else 0.0}


def _dice(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> float:
    d = pooled_dice([(torch.as_tensor(pred).long(), ref)], num_classes)
    return 0.0 if d != d else d  # NaN (both empty) cannot happen on a case with a reference label


def noc(dice: Sequence[float], target: float, cap: int = MAX_CLICKS) -> int:
    """Clicks needed to reach ``target`` Dice (the cap when never reached)."""
    return next((i for i, d in enumerate(dice) if d >= target), cap)


def summarise(curves: list[dict], max_clicks: int = MAX_CLICKS) -> dict:
    """Mean Dice at ``REPORT_AT`` clicks, mean NoC@85 / NoC@90, median seconds."""
    dice = np.array([c["dice"] for c in curves])
    return {
        "cases": len(curves),
        "dice_at": {str(n): float(dice[:, n].mean()) for n in REPORT_AT if n <= max_clicks},
        "noc85": float(np.mean([noc(c["dice"], 0.85, max_clicks) for c in curves])),
        "noc90": float(np.mean([noc(c["dice"], 0.90, max_clicks) for c in curves])),
        "plain_s": float(np.median([c["plain_s"] for c in curves])),
        "click_s": float(np.median([c["click_s"] for c in curves])),
    }


def run(models: Sequence[str | Path], cases: Sequence[dict], max_clicks: int = MAX_CLICKS,
        progress: bool = True, **segmenter_kwargs) -> dict:
    """Click curves of every model on every case (``{"image", "label"}`` files); one result per model."""
    out = {}
    for model in models:
        seg = Segmenter.from_checkpoint(model, **segmenter_kwargs)
        curves = []
        for case in tqdm(cases, desc=Path(model).name, unit="case", disable=not progress):
            image = load_image(case["image"])
            ref = load_label(case["label"])[0]
            curves.append({"case": str(case.get("id", case["image"])), **click_curve(seg, image, ref, max_clicks)})
        out[str(model)] = {"network": seg.cfg.network, "click_channels": seg.cfg.click_channels,
                           **summarise(curves, max_clicks), "curves": curves}
    return out
