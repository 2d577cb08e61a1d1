"""pumer_llava: training-free visual-token pruning and merging for LLaVA-family models.

    from pumer_llava import apply_pumer, remove_pumer
    apply_pumer(model, ratio=0.25)       # keep 25% of the visual tokens (PuMer recipe)
    model.generate(**inputs)
    model.pumer.last_stats               # tokens per layer, FLOPs, selection time
    remove_pumer(model)
"""

from .api import apply_pumer, disabled, methods_for, remove_pumer
from .config import PumerConfig
from .draw import draw_kept
from .hooks.state import ReductionStats
from .methods import METHODS, Choice, Method, MethodOptions, ScoreContext, list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Choice",
    "Method",
    "MethodOptions",
    "PumerConfig",
    "ReductionStats",
    "ScoreContext",
    "apply_pumer",
    "disabled",
    "draw_kept",
    "list_methods",
    "methods_for",
    "register_method",
    "remove_pumer",
]
