from .slices import ANNOTATE_KEY, SlicesStrategy
from .uncertainty import UncertaintyStrategy

__all__ = ["ANNOTATE_KEY", "SlicesStrategy", "UncertaintyStrategy"]
