from .free_random import FreeRandomStrategy
from .slices import ANNOTATE_KEY, SlicesStrategy
from .uncertainty import Reservations, UncertaintyStrategy

__all__ = ["ANNOTATE_KEY", "FreeRandomStrategy", "Reservations", "SlicesStrategy", "UncertaintyStrategy"]
