"""The method registry: every reduction method is one file here, registered by name.

    from pumer_llava.methods import Method, register_method
    register_method(Method(name="mine", score=my_score, default_layers=lambda depth: (2,)))
    apply_pumer(model, ratio=0.25, method="mine")

See :mod:`.base` for what a method is made of and :mod:`pumer_llava.hooks.context` for
what it is handed.
"""

from __future__ import annotations

from .base import (
    MERGE_RULES,
    NEEDS,
    Choice,
    MergeOptions,
    Method,
    MethodOptions,
    ScoreContext,
    keep_top,
    single_layer,
    visual_scorer,
)

METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` known by its name to ``apply_pumer`` and every tool. Registering a taken
    name raises ValueError unless ``replace=True``."""
    if not isinstance(method, Method):
        raise ValueError(f"register_method takes a pumer_llava.methods.Method, got {type(method).__name__}")
    if method.name in METHODS and not replace and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered: pass replace=True to replace it")
    if method.name.lower() in ("none", "off"):
        raise ValueError(f"{method.name!r} names the unreduced model in the tools: choose another name")
    METHODS[method.name] = method
    return method


def get_method(method: str | Method) -> Method:
    if isinstance(method, Method):
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(list_methods())}")
    return METHODS[method]


def list_methods() -> list[str]:
    return sorted(METHODS)


def _register_builtins() -> None:
    from . import cdpruner, dart, divprune, fastv, pumer, pyramiddrop, random, sparsevlm, visionzip, vispruner

    for mod in (pumer, fastv, vispruner, random, visionzip, divprune, cdpruner, dart, pyramiddrop, sparsevlm):
        register_method(mod.METHOD)


_register_builtins()

__all__ = [
    "MERGE_RULES",
    "METHODS",
    "NEEDS",
    "Choice",
    "MergeOptions",
    "Method",
    "MethodOptions",
    "ScoreContext",
    "get_method",
    "keep_top",
    "list_methods",
    "register_method",
    "single_layer",
    "visual_scorer",
]
