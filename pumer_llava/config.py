"""PumerConfig: the validated description of one reduction setup, and its text form.

The tools (``pumer-chat``, ``pumer-bench``, the lmms-eval plugin) take the reduction as text:
:func:`parse_reduction` turns it into a config (or None: unreduced), the method's own options
converted by its options dataclass, so every tool accepts and refuses the same things.
"""

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


# ----------------------------------------------------------------------------- text form

UNREDUCED_METHODS = ("none", "off", "unreduced")
DEFAULT_RATIO = 0.25  # apply_pumer's default


def is_none(value: Any) -> bool:
    """None, or a string that says so (``""``, ``none``, ``null``)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def parse_int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def parse_opt_int(name: str, value: Any, minimum: int | None = None) -> int | None:
    return None if is_none(value) else parse_int(name, value, minimum)


def parse_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def parse_opt_float(name: str, value: Any) -> float | None:
    return None if is_none(value) else parse_float(name, value)


def parse_layers(value: Any) -> tuple[int, ...] | None:
    """``None``, an int, a list/tuple of ints, or a string ``"[2,8,16]"`` / ``"2;8;16"`` / ``"2 8 16"``.

    A bare comma cannot be used inside ``--model_args`` (it separates arguments), so
    ``;``, ``:``, ``/``, ``|`` and spaces separate layers too; brackets keep commas.
    """
    if is_none(value):
        return None
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, str):
        s = value.strip().strip("[]()")
        for sep in ";:/|":
            s = s.replace(sep, ",")
        items = [x for x in s.replace(" ", ",").split(",") if x]
        if not items:
            raise ValueError(f"layers must name at least one decoder layer, got {value!r}")
    else:
        raise ValueError(f"layers must be decoder layer indices like [2,8,16] or 2;8;16, got {value!r}")
    try:
        return tuple(parse_int("layers", x, minimum=0) for x in items)
    except ValueError:
        raise ValueError(f"layers must be 0-based decoder layer indices like [2,8,16] or 2;8;16, got {value!r}") from None


def parse_reduction(
    ratio: Any = None,
    method: Any = "pumer",
    keep_tokens: Any = None,
    layers: Any = None,
    **options: Any,
) -> PumerConfig | None:
    """The reduction asked for in text (a command line, lmms-eval ``--model_args``), validated;
    ``None`` means unreduced. The one place the reduction's arguments are parsed.

    ``method=none`` (or ``off``) or ``ratio=1.0`` gives the unreduced model. Give
    ``ratio`` or ``keep_tokens``, not both; neither means ``ratio=0.25``. ``options`` are
    the method's own (strings converted by its options dataclass; an unknown one is an
    error listing them). Raises ValueError before anything is loaded.
    """
    if is_none(method):
        method = "none"
    if not isinstance(method, str):
        raise ValueError(f"method must be a name, got {method!r}")
    method = method.strip().lower()
    keep = parse_opt_int("keep_tokens", keep_tokens, minimum=1)
    r = parse_opt_float("ratio", ratio)
    if r is None and keep is None:
        r = DEFAULT_RATIO
    cfg_layers = parse_layers(layers)
    given = {k: v for k, v in options.items() if not is_none(v)}
    if method in UNREDUCED_METHODS:
        if keep is not None:
            raise ValueError(f"method={method} evaluates the unreduced model: keep_tokens={keep} makes no sense with it")
        if given:
            raise ValueError(f"method={method} evaluates the unreduced model: it takes no options, got {sorted(given)}")
        return None
    from .methods import get_method, list_methods

    if method not in list_methods():
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(list_methods())} "
                         f"(or {UNREDUCED_METHODS[0]}: the unreduced model)")
    m = get_method(method)
    # every option the method has is passed on: "none" is a value where its type allows it
    # (merge_threshold=none: no threshold), else it means the default
    names = m.options.names()
    opts = m.options.parse(method, {k: v for k, v in options.items() if k in names or not is_none(v)})
    config = PumerConfig(method=method, ratio=r, keep_tokens=keep, layers=cfg_layers, options=opts)
    return None if config.removes_nothing else config


def parse_options(items: list[str], flag: str = "--option") -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict (the values stay strings: each method converts its own)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out
