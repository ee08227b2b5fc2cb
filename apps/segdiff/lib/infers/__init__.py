from .segdiff import SegDiffInfer
from .segdiff_uncertainty import SegDiffUncertaintyInfer

__all__ = ["SegDiffInfer", "SegDiffUncertaintyInfer"]
