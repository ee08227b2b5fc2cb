"""Diffusion: training objective, samplers and the volume inferer."""

from .inferer import EnsembleOutput, SegDiffInferer
from .objective import DiffusionObjective
from .sampler import DiffusionSampler, MCDropoutSampler, build_sampler

__all__ = ["DiffusionObjective", "DiffusionSampler", "EnsembleOutput", "MCDropoutSampler", "SegDiffInferer", "build_sampler"]
