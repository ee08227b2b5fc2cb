from .segdiff import SegDiffTrain

__all__ = ["SegDiffTrain"]
