"""Forward hooks and the per-architecture adapter table."""

from .adapters import ADAPTERS, Adapter, get_adapter
from .state import PumerState, ReductionStats

__all__ = ["ADAPTERS", "Adapter", "PumerState", "ReductionStats", "get_adapter"]
