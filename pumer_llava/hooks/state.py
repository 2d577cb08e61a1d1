"""The one state object per patched model (``model.pumer``) and the statistics it keeps."""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..config import PumerConfig
from ..methods import Method
from .adapters import Adapter


class ReductionStats:
    """What the last forward that carried images did (decode steps leave it unchanged).

    visual_tokens_total:      per sample, visual tokens in the input.
    visual_tokens_per_layer:  per decoder layer, per sample, visual tokens that layer saw.
    tokens_per_layer:         per decoder layer, per sample, sequence length without padding.
    kept_positions:           reducing layer (-1: before the first decoder layer) -> per sample, positions (in the padded input
                              sequence) of the visual tokens still present from that layer on.
    kept_patches:             the same as indices into the sample's visual span (0 .. T-1),
                              i.e. which image patches survive: draw them on the image.
    flops / flops_unreduced:  decoder FLOPs estimate (``reduce.flops``) summed over the batch,
                              scoring work included in ``flops``.
    select_seconds:           wall time spent scoring, selecting and merging.
    reducing_layers:          the decoder layers that reduced.
    merged_per_layer:         reducing layer -> per sample, visual tokens folded into another one
                              there (the rest of what the layer removed was dropped).

    Lazy: a prefill hands over its device tensors and a builder, and the lists are made on
    first access (reading them waits for the device), so a forward pays no host sync for
    statistics nobody reads. ``ReductionStats(**fields)`` builds one from values.
    """

    FIELDS = ("visual_tokens_total", "visual_tokens_per_layer", "tokens_per_layer", "kept_positions",
              "kept_patches", "flops", "flops_unreduced", "select_seconds", "reducing_layers", "merged_per_layer")
    OPTIONAL = {"reducing_layers": list, "merged_per_layer": dict}

    def __init__(self, *, builder=None, **values):
        if builder is None:
            missing = [f for f in self.FIELDS if f not in values and f not in self.OPTIONAL]
            if missing or set(values) - set(self.FIELDS):
                raise TypeError(f"ReductionStats takes {', '.join(self.FIELDS)}; missing {missing}, "
                                f"unknown {sorted(set(values) - set(self.FIELDS))}")
            for f, empty in self.OPTIONAL.items():
                values.setdefault(f, empty())
            self.__dict__.update(values)
        else:
            self.__dict__["_builder"] = builder

    def __getattr__(self, name):
        builder = self.__dict__.get("_builder")
        if name in self.FIELDS and builder is not None:
            del self.__dict__["_builder"]
            self.__dict__.update(builder())
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in self.FIELDS:
            getattr(self, name)  # build first, so a later read does not overwrite the change
        object.__setattr__(self, name, value)

    def __eq__(self, other):
        if not isinstance(other, ReductionStats):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.FIELDS if f != "select_seconds")

    def __repr__(self) -> str:
        if "_builder" in self.__dict__:
            return "ReductionStats(<not read yet>)"
        return f"ReductionStats(visual_tokens_final={self.visual_tokens_final}, flops_ratio={self.flops_ratio:.3f})"

    def __deepcopy__(self, memo):
        return ReductionStats(**{f: copy.deepcopy(getattr(self, f), memo) for f in self.FIELDS})

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_unreduced if self.flops_unreduced else 1.0

    @property
    def visual_tokens_final(self) -> list[int]:
        return list(self.visual_tokens_per_layer[-1]) if self.visual_tokens_per_layer else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "visual_tokens_total": self.visual_tokens_total,
            "visual_tokens_per_layer": self.visual_tokens_per_layer,
            "visual_tokens_final": self.visual_tokens_final,
            "tokens_per_layer": self.tokens_per_layer,
            "reducing_layers": self.reducing_layers,
            "kept_positions": {str(k): v for k, v in self.kept_positions.items()},
            "kept_patches": {str(k): v for k, v in self.kept_patches.items()},
            "flops": self.flops,
            "flops_unreduced": self.flops_unreduced,
            "flops_ratio": self.flops_ratio,
            "select_seconds": self.select_seconds,
        }


@dataclass
class PumerState:
    """Reached as ``model.pumer``: the config, the hook handles, the current call, stats.

    ``call`` is the scratch of the inner model's current forward (a ``Prefill`` or an
    ``Extend``, see :mod:`.prefill` and :mod:`.decode`), replaced at the start of each.
    ``prompt`` is the last reducing prefill's decision (a forward that extends its prompt
    without a cache reuses it). Everything that describes a KV cache lives in the cache.
    """

    config: PumerConfig
    method: Method
    adapter: Adapter
    layers: tuple[int, ...]
    model_ref: Any = None  # weakref to the patched model
    flash: bool = False  # flash attention takes 2-D masks
    eager: bool = False  # eager attention adds a float mask
    visual_ids: torch.Tensor | None = None  # placeholder ids of visual tokens (images, video)
    visual_id_set: frozenset = frozenset()  # the same, on the host
    handles: list[Any] = field(default_factory=list)
    enabled: bool = True
    last_stats: ReductionStats | None = None
    call: Any = None
    prompt: Any = None
    logits_to_keep: Any = 0  # the top-level call's, read when scattering hidden states back
    labels: tuple[Any, Any] = (None, None)  # the top-level call's labels / shift_labels (clones)
    options: Any = None  # the method's options (config.options, or the method's defaults)
    vision_info: Any = None  # the tower's VisionParts, for methods that read the tower
    # per tower call since the last prefill (``.vision.TowerCall``): importance, keys, projector output
    vision_calls: list[Any] = field(default_factory=list)
    vision_consumed: bool = False  # a prefill read vision_calls: the next tower call starts a new list
    projecting: bool = False  # a method is calling the projector itself: not a tower call

    def __deepcopy__(self, memo):
        # copy.deepcopy(model) copies this state with the hooks that hold it: point the copy at
        # the copied model (already in ``memo``), so it reduces, reports and removes on its own
        model = self.model_ref() if self.model_ref is not None else None
        new = object.__new__(type(self))
        memo[id(self)] = new
        for f in fields(self):
            if f.name == "model_ref":
                twin = memo.get(id(model)) if model is not None else None
                new.model_ref = weakref.ref(twin) if twin is not None else None
            elif f.name == "call":
                new.call = None  # a forward's scratch, not part of the setup
            else:
                setattr(new, f.name, copy.deepcopy(getattr(self, f.name), memo))
        return new

    @property
    def model(self):
        return self.model_ref()

    @property
    def model_config(self):
        return self.model_ref().config

    @property
    def text_config(self):
        return self.adapter.text_config(self.model_ref().config)

    @property
    def depth(self) -> int:
        return len(self.adapter.layers(self.model_ref()))

    @property
    def importance(self) -> torch.Tensor | None:
        """(n_views, P) the vision tower's importance of every token of its last call (methods
        that read the tower), or None."""
        return self.vision_calls[-1].importance if self.vision_calls else None

    @property
    def merge_share(self) -> float:
        """Share of each stage's removal done by merging (the options' ``merge_share``, else 0)."""
        return float(getattr(self.options, "merge_share", 0.0))

    @property
    def prop_attn(self) -> bool:
        return bool(getattr(self.options, "prop_attn", False))

    @property
    def merge_text(self) -> float:
        """Share of the prompt's mergeable text merged away over the cascade (``merge_text``, else 0)."""
        return float(getattr(self.options, "merge_text", 0.0))

    def to_dict(self) -> dict[str, Any]:
        """The setup as it runs: the config with the resolved layers and every option."""
        d = self.config.to_dict()
        d.update(self.options.to_dict())
        d.update(layers=list(self.layers), before_llm=self.method.before_llm is not None)
        return d
