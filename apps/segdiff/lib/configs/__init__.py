from .segdiff import SegDiffTaskConfig

__all__ = ["SegDiffTaskConfig"]
