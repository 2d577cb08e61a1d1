"""PumerConfig: the validated description of one reduction setup."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PumerConfig:
    """What to reduce, where, and by how much.

    method:      a name from :data:`pumer_llava.methods.METHODS` (``list_methods()``).
    ratio:       fraction of each image's visual tokens still in the sequence after the
                 last reducing layer, in (0, 1]; 1.0 removes nothing. Several images (or a
                 video) in one prompt each keep their own share.
    keep_tokens: the same budget as an absolute count of visual tokens (per image).
                 Give ``ratio`` or ``keep_tokens``, not both.
    layers:      decoder layers (0-based) at which tokens are removed; ``None`` takes the
                 method's default for the model's depth. Several layers make a cascade:
                 each removes the same fraction, and the last lands on the budget exactly.
    options:     the method's own options (its :class:`~pumer_llava.methods.MethodOptions`
                 dataclass, e.g. PuMer's ``merge_share``); None: the method's defaults. Build
                 a config with :meth:`make` to pass them as keywords.
    """

    method: str = "pumer"
    ratio: float | None = 0.25
    keep_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    options: Any = None

    def __post_init__(self) -> None:
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers))
        self.validate()

    def validate(self) -> None:
        """Check what can be checked without a model; raise ValueError saying what is accepted."""
        if self.keep_tokens is not None:
            if self.ratio is not None:
                raise ValueError(
                    f"give ratio or keep_tokens, not both (got ratio={self.ratio}, keep_tokens={self.keep_tokens})"
                )
            if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 1:
                raise ValueError(f"keep_tokens must be a positive int, got {self.keep_tokens!r}")
        else:
            if self.ratio is None:
                raise ValueError("give ratio (a fraction in (0, 1]) or keep_tokens (a positive int)")
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
            if not (math.isfinite(self.ratio) and 0.0 < self.ratio <= 1.0):
                raise ValueError(f"ratio must be in (0, 1] (1.0 = nothing removed), got {self.ratio}")
        if self.layers is not None:
            if len(self.layers) == 0:
                raise ValueError("layers must name at least one decoder layer, got an empty list")
            if any(isinstance(x, bool) or not isinstance(x, int) for x in self.layers):
                raise ValueError(f"layers must be ints (0-based decoder layer indices), got {self.layers!r}")
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {list(self.layers)}")
        if self.options is not None:
            from .methods import METHODS, MethodOptions

            if not isinstance(self.options, MethodOptions):
                raise ValueError(f"options must be a method's MethodOptions dataclass, got {self.options!r}")
            cls = METHODS[self.method].options if self.method in METHODS else None
            if cls is not None and type(self.options) is not cls:
                raise ValueError(f"options for method {self.method!r} must be {cls.__name__}, got {self.options!r}")

    @classmethod
    def make(cls, method: Any = "pumer", ratio: float | None = None, keep_tokens: int | None = None,
             layers=None, **options: Any) -> PumerConfig:
        """A config with the method's options as keywords, validated against its dataclass
        (an unknown option raises ValueError listing the method's options)."""
        from .methods import get_method

        m = get_method(method)
        if ratio is None and keep_tokens is None:
            ratio = 0.25
        return cls(method=m.name, ratio=ratio, keep_tokens=keep_tokens,
                   layers=tuple(layers) if layers is not None else None, options=m.options.build(m.name, options))


    @property
    def removes_nothing(self) -> bool:
        return self.keep_tokens is None and self.ratio == 1.0

    def to_dict(self) -> dict[str, Any]:
        """Flat: method, ratio, keep_tokens, layers and every option of the method."""
        d = {"method": self.method, "ratio": self.ratio, "keep_tokens": self.keep_tokens,
             "layers": list(self.layers) if self.layers is not None else None}
        opts = self.options
        if opts is None and isinstance(self.method, str):
            from .methods import METHODS

            opts = METHODS[self.method].options() if self.method in METHODS else None
        if opts is not None:
            d.update(opts.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PumerConfig:
        """The inverse of :meth:`to_dict` (options by name, validated against the method)."""
        d = dict(d)
        common = {k: d.pop(k) for k in ("method", "ratio", "keep_tokens", "layers") if k in d}
        return cls.make(**common, **d)
