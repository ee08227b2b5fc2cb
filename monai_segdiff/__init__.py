"""monai-segdiff: conditional diffusion segmentation with uncertainty, on MONAI."""

__version__ = "0.1.0"
