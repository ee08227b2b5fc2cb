from .segdiff import SegDiffInfer, SegDiffUncertaintyInfer

__all__ = ["SegDiffInfer", "SegDiffUncertaintyInfer"]
