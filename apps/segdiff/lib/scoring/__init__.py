from .uncertainty import SCORE_KEY, TS_KEY, UncertaintyScoring

__all__ = ["SCORE_KEY", "TS_KEY", "UncertaintyScoring"]
