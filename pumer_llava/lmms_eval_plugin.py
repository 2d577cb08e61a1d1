"""lmms-eval model ``pumer_llava``: a LLaVA-family HF model with visual-token reduction.

Usage::

    lmms-eval --model pumer_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,ratio=0.25,method=pumer,load_in_4bit=true \\
        --tasks pope --batch_size 8 --output_path results/

Registered through the ``lmms_eval.models`` entry point (``MANIFEST`` below), so no
file is copied into lmms-eval. The keyword arguments of :class:`PumerLlava` are the
``--model_args`` surface, as in lmms-eval's own ``llava_hf``: every ``apply_pumer``
argument (``ratio``, ``method``, ``keep_tokens``, ``layers``, and the method's own options
such as ``merge_share`` or ``dominant``) plus loading and generation defaults. ``ratio=1.0`` or
``method=none`` evaluates the unreduced model. ``layers`` takes ``[2,8,16]`` or
``2;8;16`` (a bare comma would split ``--model_args``).

What differs from ``llava_hf`` on purpose:

- ``generate_until`` really batches (left padding, requests sorted by prompt length
  as lmms-eval's ``Collator`` does, grouped by generation kwargs), and uses the
  processor's chat template when it has one.
- An exception never becomes a silent empty answer: a failing batch is retried one
  sample at a time; each failing sample is logged with its task and doc id and
  counted, and the run raises once failures exceed ``max_failure_rate`` of the
  requests (default 0.05; 0 = the first failure raises). Note that lmms-eval's CLI
  catches that exception, prints it and exits 0 without a results file: check for
  the results file (``eval/lmms/check_results.py`` does).
- The reduction is recorded: the resolved config and per-sample visual-token counts
  (``model.pumer.last_stats``) go to a sidecar JSON ``<stamp>_pumer_stats.json`` next
  to lmms-eval's ``<stamp>_results.json`` (lmms-eval 0.7.3 gives a model no way to
  add a section to the results JSON), and their means go into the results JSON's
  ``throughput`` section through lmms-eval's ``log_metrics`` (``avg_pumer_*`` keys).

The argument parsing, the failure counting and the stats bookkeeping are plain
functions and classes that work without lmms-eval installed (tested in
``tests/test_lmms_plugin.py``); only :class:`PumerLlava` needs lmms-eval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import (  # noqa: F401  the reduction's text form is the config's (re-exported for callers)
    DEFAULT_RATIO,
    UNREDUCED_METHODS,
    PumerConfig,
    is_none as _none,
    parse_float,
    parse_int,
    parse_layers,
    parse_opt_float,
    parse_opt_int,
    parse_reduction,
)

DEFAULT_IMAGE_TOKEN = "<image>"

# llava_hf's fallback for tokenizers without a chat template (LLaVA-1.5 / Vicuna format).
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %} ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ----------------------------------------------------------------------------- arguments


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def parse_opt_bool(name: str, value: Any) -> bool | None:
    return None if _none(value) else parse_bool(name, value)


from .loading import DTYPE_NAMES as DTYPES  # noqa: E402  the tools' one dtype vocabulary


@dataclass
class PluginArgs:
    """Every ``--model_args`` value after parsing and validation."""

    pretrained: str
    reduction: PumerConfig | None
    revision: str = "main"
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str | None = None
    load_in_4bit: bool = False
    batch_size: int = 1
    max_new_tokens: int = 128
    chat_template: str | None = None
    use_cache: bool = True
    trust_remote_code: bool = False
    device_map: str = ""
    max_failure_rate: float = 0.05
    stats_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reduction"] = self.reduction.to_dict() if self.reduction is not None else None
        return d


_ATTN = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


def parse_model_args(
    pretrained: Any = None,
    ratio: Any = None,
    method: Any = "pumer",
    keep_tokens: Any = None,
    layers: Any = None,
    revision: Any = "main",
    device: Any = None,
    dtype: Any = "auto",
    attn_implementation: Any = None,
    load_in_4bit: Any = False,
    batch_size: Any = 1,
    max_batch_size: Any = None,
    max_new_tokens: Any = 128,
    chat_template: Any = None,
    use_cache: Any = True,
    trust_remote_code: Any = False,
    device_map: Any = "",
    max_failure_rate: Any = 0.05,
    stats_path: Any = None,
    **unknown: Any,
) -> PluginArgs:
    """Validate ``--model_args`` (already split by lmms-eval, values as it converts them).

    Raises ValueError naming the argument and what is accepted; nothing is loaded here.
    """
    known = [p for p in parse_model_args.__code__.co_varnames[: parse_model_args.__code__.co_argcount]]
    if unknown:  # the method's own options, or a mistake
        from .methods import METHODS

        name = method.strip().lower() if isinstance(method, str) else method
        names = METHODS[name].options.names() if name in METHODS else []
        stray = sorted(k for k in unknown if k not in names)
        if stray:
            own = f"; method {name!r} takes {', '.join(names)}" if names else f"; method {name!r} takes no options"
            raise ValueError(f"unknown model_args {stray}; pumer_llava accepts: {', '.join(known)}"
                             f"{own if name in METHODS else ''}")
    if _none(pretrained) or not isinstance(pretrained, str):
        raise ValueError(f"pretrained must name a model folder or hub id, got {pretrained!r}")
    reduction = parse_reduction(ratio, method, keep_tokens, layers, **unknown)
    dtype_s = "auto" if _none(dtype) else str(dtype).strip().lower().replace("torch.", "")
    if dtype_s not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    attn = None if _none(attn_implementation) else str(attn_implementation).strip()
    if attn is not None and attn not in _ATTN:
        raise ValueError(f"attn_implementation must be one of {', '.join(_ATTN)} (or unset), got {attn!r}")
    dev = "auto" if _none(device) else str(device).strip()
    if not (dev == "auto" or dev == "cpu" or dev.startswith("cuda") or dev == "mps" or dev.startswith("xpu")):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N, mps or xpu, got {device!r}")
    rate = parse_float("max_failure_rate", max_failure_rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"max_failure_rate must be in [0, 1] (0 = the first failure stops the run), got {rate}")
    if not _none(max_batch_size):
        parse_int("max_batch_size", max_batch_size, minimum=1)  # accepted for lmms-eval's CLI, unused
    bs = batch_size
    if isinstance(bs, str) and bs.strip().startswith("auto"):
        raise ValueError("batch_size=auto is not supported by pumer_llava: give an integer")
    return PluginArgs(
        pretrained=pretrained,
        reduction=reduction,
        revision="main" if _none(revision) else str(revision),
        device=dev,
        dtype=dtype_s,
        attn_implementation=attn,
        load_in_4bit=parse_bool("load_in_4bit", load_in_4bit),
        batch_size=parse_int("batch_size", bs, minimum=1),
        max_new_tokens=parse_int("max_new_tokens", max_new_tokens, minimum=1),
        chat_template=None if _none(chat_template) else str(chat_template),
        use_cache=parse_bool("use_cache", use_cache),
        trust_remote_code=parse_bool("trust_remote_code", trust_remote_code),
        device_map="" if _none(device_map) else str(device_map),
        max_failure_rate=rate,
        stats_path=None if _none(stats_path) else str(stats_path),
    )


# ------------------------------------------------------------------------------ failures


class TooManyFailures(RuntimeError):
    """Raised when more requests failed than ``max_failure_rate`` allows."""


@dataclass
class FailureTracker:
    """Counts failed requests of one lmms-eval call and stops the run past the threshold.

    ``total`` is the number of requests of the call; at most ``floor(rate * total)``
    may fail (so ``rate=0`` raises on the first failure).
    """

    total: int
    max_rate: float
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def allowed(self) -> int:
        return int(math.floor(self.max_rate * self.total + 1e-9))

    @property
    def count(self) -> int:
        return len(self.failures)

    def record(self, sample_id: str, error: BaseException, log=None) -> None:
        """Log and count one failed request; raise :class:`TooManyFailures` past the threshold."""
        msg = f"{type(error).__name__}: {error}"
        self.failures.append({"sample": sample_id, "error": msg})
        if log is not None:
            log(f"pumer_llava: request {sample_id} failed ({self.count}/{self.total}, {self.allowed} allowed): {msg}")
        if self.count > self.allowed:
            raise TooManyFailures(
                f"{self.count} of {self.total} requests failed, more than max_failure_rate={self.max_rate} "
                f"allows ({self.allowed}); first failures: "
                + "; ".join(f"{f['sample']}: {f['error']}" for f in self.failures[:3])
            ) from error


def run_chunks(chunks, run_batch, tracker: FailureTracker, on_fail, log_error=None, log_warning=None) -> dict:
    """Run ``run_batch(items) -> answers`` on each chunk of ``(key, item)`` pairs.

    A failing chunk is retried one item at a time, so one bad sample does not take its
    batch-mates down; every item that still fails is reported to ``on_fail(item, exc)``
    (which returns its sample id), counted by ``tracker`` (which raises
    :class:`TooManyFailures` past the threshold) and gets the answer ``None``.
    Returns ``{key: answer}``.
    """
    answers: dict[Any, Any] = {}

    def fail(key, item, exc):
        tracker.record(on_fail(item, exc), exc, log=log_error)
        answers[key] = None

    for chunk in chunks:
        try:
            outs = run_batch([item for _, item in chunk])
            if len(outs) != len(chunk):
                raise RuntimeError(f"{len(outs)} answers for {len(chunk)} requests")
            for (key, _), ans in zip(chunk, outs):
                answers[key] = ans
            continue
        except TooManyFailures:
            raise
        except Exception as exc:
            if len(chunk) == 1:
                fail(chunk[0][0], chunk[0][1], exc)
                continue
            if log_warning is not None:
                log_warning(f"pumer_llava: a batch of {len(chunk)} failed ({exc!r}); retrying one at a time")
        for key, item in chunk:
            try:
                answers[key] = run_batch([item])[0]
            except TooManyFailures:
                raise
            except Exception as exc:
                fail(key, item, exc)
    return answers


# --------------------------------------------------------------------------------- stats


def sample_id(task: str, split: str, doc_id: Any) -> str:
    return f"{task}/{split}/{doc_id}"


@dataclass
class StatsRecorder:
    """Per-sample visual-token counts and the reduction config of one evaluation run."""

    model_args: dict[str, Any]
    reduction: dict[str, Any] | None
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    gen_tokens: int = 0
    gen_seconds: float = 0.0

    def add_batch(self, ids: list[str], visual_in: list[int], stats: Any, kind: str) -> None:
        """Record one batch. ``stats`` is ``model.pumer.last_stats`` (or None when unreduced).

        ``visual_in`` are the image tokens of each sample's input, counted from the ids.
        """
        d = stats.to_dict() if stats is not None and hasattr(stats, "to_dict") else stats
        per_layer = (d or {}).get("visual_tokens_per_layer") or []
        final = (d or {}).get("visual_tokens_final") or (list(per_layer[-1]) if per_layer else None)
        totals = (d or {}).get("visual_tokens_total")
        for i, sid in enumerate(ids):
            rec = {"request": kind, "visual_tokens_in": int(visual_in[i])}
            if d is not None:
                rec["visual_tokens_total"] = int(totals[i]) if totals else int(visual_in[i])
                rec["visual_tokens_final"] = int(final[i]) if final else int(visual_in[i])
                rec["visual_tokens_per_layer"] = [int(layer[i]) for layer in per_layer]
            else:
                rec["visual_tokens_total"] = int(visual_in[i])
                rec["visual_tokens_final"] = int(visual_in[i])
            self.samples[sid] = rec
        if d is not None:
            self.batches.append(
                {
                    "size": len(ids),
                    "flops_ratio": d.get("flops_ratio"),
                    "select_seconds": d.get("select_seconds"),
                    "reducing_layers": d.get("reducing_layers"),
                }
            )

    def summary(self) -> dict[str, float]:
        """Numeric means (for lmms-eval's throughput section)."""
        recs = list(self.samples.values())
        out: dict[str, float] = {"pumer_samples": float(len(recs)), "pumer_failures": float(len(self.failures))}
        if recs:
            vin = sum(r["visual_tokens_in"] for r in recs) / len(recs)
            vfin = sum(r["visual_tokens_final"] for r in recs) / len(recs)
            out["pumer_visual_tokens_in"] = vin
            out["pumer_visual_tokens_final"] = vfin
            out["pumer_visual_keep_ratio"] = vfin / vin if vin else 1.0
        ratios = [b["flops_ratio"] for b in self.batches if isinstance(b.get("flops_ratio"), (int, float))]
        if ratios:
            out["pumer_flops_ratio"] = sum(ratios) / len(ratios)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "reduction": self.reduction,
            "model_args": self.model_args,
            "summary": self.summary(),
            "generated_tokens": self.gen_tokens,
            "generate_seconds": self.gen_seconds,
            "failures": self.failures,
            "batches": self.batches,
            "samples": self.samples,
        }

    @classmethod
    def merged(cls, parts: list["StatsRecorder"]) -> "StatsRecorder":
        """The statistics of one run split over processes (one recorder per rank, rank order).

        Samples are keyed by ``task/split/doc``: lmms-eval shards documents, so each is on
        one rank, except the copies of a rank's last request it runs to even out the ranks
        (the same sample, recorded again with the same counts). Failures and batches are
        concatenated, generated tokens and seconds summed (seconds are per-process time,
        added up).
        """
        if not parts:
            raise ValueError("merging statistics needs at least one rank's")
        out = cls(model_args=parts[0].model_args, reduction=parts[0].reduction)
        for rank, part in enumerate(parts):
            for sid, rec in part.samples.items():
                out.samples.setdefault(sid, {**rec, "rank": rank})
            out.failures.extend({**f, "rank": rank} for f in part.failures)
            out.batches.extend(part.batches)
            out.gen_tokens += part.gen_tokens
            out.gen_seconds += part.gen_seconds
        return out

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _argv_value(flag: str, argv: list[str] | None = None) -> str | None:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument(flag, default=None)
    try:
        ns, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    except SystemExit:
        return None
    return getattr(ns, flag.lstrip("-").replace("-", "_"))


def output_path_from_argv(argv: list[str] | None = None) -> str | None:
    """lmms-eval's ``--output_path`` from the command line (the model is not told it)."""
    return _argv_value("--output_path", argv)


def rank_stats_path(path: str | Path, rank: int) -> Path:
    """Where one process of a multi-process run writes its own statistics, next to the merged file."""
    path = Path(path)
    return path.with_name(f"{path.stem}_rank{rank}{path.suffix}")


def launcher_rank() -> tuple[int, int, int]:
    """``(rank, local rank, world size)`` as ``accelerate launch`` / ``torchrun`` set them."""
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", env.get("RANK", "0")))
    except ValueError as exc:
        raise ValueError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"the launcher set RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, local, world


def default_stats_path(output_path: str, pretrained: str, stamp: str | None = None) -> Path:
    """``<output_path>/<model folder lmms-eval uses>/<stamp>_pumer_stats.json``."""
    try:  # lmms-eval names the folder after the sanitized ``pretrained``
        from lmms_eval.utils import sanitize_model_name

        folder = sanitize_model_name(pretrained)
    except Exception:
        folder = pretrained.replace("/", "__")
    if stamp is None:
        try:  # the clock lmms-eval stamps its results with (its --timezone, Asia/Singapore by default)
            from lmms_eval.utils import get_datetime_str

            stamp = get_datetime_str(timezone=_argv_value("--timezone") or "Asia/Singapore")
        except Exception:
            stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path(output_path) / folder / f"{stamp}_pumer_stats.json"


# ------------------------------------------------------------------------------ prompts


def build_prompt(context: str, n_images: int, processor: Any, chat_template: str | None = None) -> str:
    """The model's prompt for one request: image tokens then the task's text, in a chat turn.

    The processor's chat template (list content: one ``{"type": "image"}`` per image and
    the text) is used when it has one, as LLaVA-HF checkpoints ship it; else the
    tokenizer's template with ``<image>`` prepended (llava_hf's way); else Vicuna's.
    If the task already placed image tokens in the context, they are left where they are.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
    placed = image_token in context or DEFAULT_IMAGE_TOKEN in context
    if chat_template is None and getattr(processor, "chat_template", None):
        content = ([] if placed else [{"type": "image"}] * n_images) + [{"type": "text", "text": context}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if not placed and n_images:
        context = " ".join([image_token] * n_images) + "\n" + context
    template = chat_template or getattr(tokenizer, "chat_template", None) or VICUNA_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True, chat_template=template
    )


def apply_until(text: str, until: list[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def flatten_visuals(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return list(visuals)


# ------------------------------------------------------------------------- lmms-eval side


try:  # the model class needs lmms-eval; the helpers above do not
    from lmms_eval.api.model import lmms as _LmmsBase
    from lmms_eval.models.registry_v2 import ModelManifest

    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:  # pragma: no cover - older lmms-eval keeps tuples as they are
        GenerationResult = None
    HAVE_LMMS_EVAL = True
except Exception:  # pragma: no cover - exercised only without lmms-eval
    _LmmsBase = object
    ModelManifest = None
    GenerationResult = None
    HAVE_LMMS_EVAL = False


def _result(value):
    """A loglikelihood answer in the form lmms-eval's evaluator keeps (see ``loglikelihood``)."""
    if GenerationResult is None:  # pragma: no cover - without lmms-eval
        return value
    return GenerationResult(text=value)


class PumerLlava(_LmmsBase):
    """LLaVA-family HF model with ``apply_pumer`` visual-token reduction, for lmms-eval.

    Usage::

        lmms-eval --model pumer_llava \\
            --model_args pretrained=llava-hf/llava-1.5-7b-hf,ratio=0.25,method=pumer \\
            --tasks pope --batch_size 8 --output_path results/

    Reduction: ratio, method (``pumer_llava.list_methods()`` or none), keep_tokens, layers
    ([2,8,16] or 2;8;16), and the method's own options (e.g. merge_share for pumer, dominant for
    visionzip, important_ratio for vispruner, seed for random). Loading: pretrained, revision,
    device (auto/cpu/cuda[:N]), dtype (auto/float32/float16/bfloat16),
    attn_implementation, load_in_4bit, device_map, trust_remote_code. Generation:
    batch_size, max_new_tokens (default when the task gives none), chat_template,
    use_cache. Bookkeeping: max_failure_rate (default 0.05), stats_path (default
    next to the results file).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "llava-hf/llava-1.5-7b-hf",
        ratio: float | str | None = None,
        method: str = "pumer",
        keep_tokens: int | str | None = None,
        layers: str | list[int] | None = None,
        revision: str = "main",
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        load_in_4bit: bool | str = False,
        batch_size: int | str = 1,
        max_batch_size: int | str | None = None,
        max_new_tokens: int | str = 128,
        chat_template: str | None = None,
        use_cache: bool | str = True,
        trust_remote_code: bool | str = False,
        device_map: str = "",
        max_failure_rate: float | str = 0.05,
        stats_path: str | None = None,
        **unknown: Any,
    ) -> None:
        given = {k: v for k, v in locals().items() if k not in ("self", "unknown", "__class__")}
        self.args = parse_model_args(**given, **unknown)  # raises ValueError before anything is loaded
        if not HAVE_LMMS_EVAL:
            raise ImportError("PumerLlava needs lmms-eval 0.7.3: see eval/lmms/INSTALL_NOTES.md")
        super().__init__()
        import torch
        from loguru import logger

        self._log = logger
        a = self.args
        # lmms-eval shards the documents by the launcher's RANK / WORLD_SIZE; each process
        # evaluates its shard on its own GPU (LOCAL_RANK), or on the CPU
        self._rank, local_rank, self._world_size = launcher_rank()
        if a.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            if device == "cuda" and self._world_size > 1 and not a.device_map:
                device = f"cuda:{local_rank}"
        else:
            device = a.device
        self._device = torch.device(device)

        from .loading import load_model

        self._model, self._processor, self._adapter = load_model(
            a.pretrained, device=self._device, dtype=None if a.dtype == "auto" else a.dtype,
            quant="4bit" if a.load_in_4bit else None, attn=a.attn_implementation, revision=a.revision,
            trust_remote_code=a.trust_remote_code, device_map=a.device_map or None,
        )
        self._tokenizer = self._processor.tokenizer
        self._tokenizer.padding_side = "left"  # batched generation: the prompt ends at the same index
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._config = self._model.config
        self.batch_size_per_gpu = a.batch_size
        self.chat_template = a.chat_template
        self.use_cache = a.use_cache

        if a.reduction is not None:
            from . import apply_pumer

            r = a.reduction
            apply_pumer(self._model, ratio=r.ratio, method=r.method, keep_tokens=r.keep_tokens, layers=r.layers,
                        **r.options.to_dict())
            resolved = self._model.pumer.to_dict()
        else:
            resolved = {"method": "none", "ratio": 1.0}
        self.stats = StatsRecorder(model_args={k: v for k, v in a.to_dict().items() if k != "reduction"}, reduction=resolved)
        self._stats_path = self._resolve_stats_path()
        self._log.info(f"pumer_llava: {a.pretrained} on {self._device}, reduction {resolved}")

    # lmms-eval's model protocol --------------------------------------------------------

    @property
    def config(self):
        return self._config

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def model(self):
        return self._model

    @property
    def eot_token_id(self):
        return self._tokenizer.eos_token_id

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    def tok_encode(self, string: str, left_truncate_len=None, add_special_tokens=None) -> list[int]:
        add = False if add_special_tokens is None else add_special_tokens
        ids = self._tokenizer.encode(string, add_special_tokens=add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens):
        return self._tokenizer.decode(tokens)

    # helpers -----------------------------------------------------------------------------

    def _resolve_stats_path(self) -> Path | None:
        if self.args.stats_path:
            return Path(self.args.stats_path)
        out = output_path_from_argv()
        return default_stats_path(out, self.args.pretrained) if out else None

    def _gathered_stats(self) -> tuple[StatsRecorder, Path | None]:
        """This run's statistics over every process, and where the merged file goes.

        Every rank calls this at the end of each request type (lmms-eval runs each type on
        every rank, with no requests where a rank has none), so the collective matches.
        Each rank writes its own ``*_rank<r>.json``; the merged file is named by rank 0's
        path, so all ranks agree even when they started in different seconds.
        """
        import torch.distributed as dist

        if self._world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            if self._world_size > 1:
                self._log.warning("pumer_llava: WORLD_SIZE > 1 without a process group: statistics cover this rank only")
            return self.stats, self._stats_path
        parts: list = [None] * self._world_size
        dist.all_gather_object(parts, (self.stats, self._stats_path))
        merged_path = parts[0][1]
        if merged_path is not None:
            path = self.stats.write(rank_stats_path(merged_path, self._rank))
            self._log.info(f"pumer_llava: rank {self._rank}'s statistics written to {path}")
        return StatsRecorder.merged([p[0] for p in parts]), merged_path

    def _flush_stats(self) -> None:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        stats, path = self._gathered_stats()
        speed = stats.gen_tokens / stats.gen_seconds if stats.gen_seconds > 0 else 0.0
        log_metrics(  # the results JSON is written by rank 0: these are the means over all ranks
            total_elapsed_time=stats.gen_seconds,
            total_gen_tokens=stats.gen_tokens,
            avg_speed=speed,
            additional_metrics=stats.summary(),
        )
        if self._rank != 0:
            return
        if path is not None:
            stats.write(path)
            self._log.info(f"pumer_llava: reduction config and per-sample visual tokens written to {path}")
        else:
            self._log.warning("pumer_llava: no --output_path and no stats_path: per-sample stats are not written")

    def _doc(self, task: str, split: str, doc_id: Any):
        return self.task_dict[task][split][doc_id]

    def _visual_counts(self, input_ids) -> list[int]:
        from .loading import count_visual_tokens

        return count_visual_tokens(self._adapter, self._model.config, input_ids)

    def _last_stats(self):
        state = getattr(self._model, "pumer", None)
        return None if state is None else state.last_stats

    def _encode(self, prompts: list[str], visuals: list):
        kw: dict[str, Any] = dict(text=prompts, return_tensors="pt", padding=True)
        if visuals:
            kw["images"] = visuals
        inputs = self._processor(**kw)
        return inputs.to(self._device)

    def _cast(self, inputs):
        import torch

        dtype = next(p.dtype for p in self._model.parameters() if p.is_floating_point())
        if "pixel_values" in inputs and dtype in (torch.float16, torch.bfloat16, torch.float32):
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    # generate_until -----------------------------------------------------------------------

    def _generate_batch(self, items: list[tuple], gen_kwargs: dict) -> list[str]:
        import torch

        prompts, visuals = [], []
        for context, _, doc_to_visual, doc_id, task, split in items:
            vis = [v.convert("RGB") if hasattr(v, "convert") else v for v in flatten_visuals(doc_to_visual(self._doc(task, split, doc_id)))]
            if any(isinstance(v, str) for v in vis):
                raise ValueError("pumer_llava evaluates images; this request carries a video or path")
            prompts.append(build_prompt(context, len(vis), self._processor, self.chat_template))
            visuals.extend(vis)
        inputs = self._cast(self._encode(prompts, visuals))
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        gen = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.args.max_new_tokens)),
            do_sample=do_sample,
            num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
            use_cache=self.use_cache,
            pad_token_id=self._tokenizer.pad_token_id,
        )
        if do_sample:
            gen["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                gen["top_p"] = float(gen_kwargs["top_p"])
        else:
            gen.update(temperature=None, top_p=None, top_k=None)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self._model.generate(**inputs, **gen)
        self.stats.gen_seconds += time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1] :]
        eos = self._tokenizer.eos_token_id
        pad = self._tokenizer.pad_token_id
        self.stats.gen_tokens += int(((new != pad) & (new != eos)).sum()) if pad is not None else int(new.numel())
        texts = self._tokenizer.batch_decode(new, skip_special_tokens=True)
        ids = [sample_id(t, s, d) for _, _, _, d, t, s in items]
        self.stats.add_batch(ids, self._visual_counts(inputs["input_ids"]), self._last_stats(), "generate_until")
        return [apply_until(t, until).strip() for t in texts]

    def _run_batches(self, chunks, total: int, run_batch) -> dict:
        tracker = FailureTracker(total=total, max_rate=self.args.max_failure_rate)

        def failed(item, exc):
            sid = sample_id(item[4], item[5], item[3])
            self.stats.failures.append({"sample": sid, "error": f"{type(exc).__name__}: {exc}"})
            return sid

        return run_chunks(chunks, run_batch, tracker, failed, log_error=self._log.error, log_warning=self._log.warning)

    def generate_until(self, requests) -> list[str]:
        from tqdm import tqdm

        args = [req.args for req in requests]
        # Sort by prompt length (longest first, as lmms-eval's Collator does) inside groups
        # of equal generation kwargs, so batches pad little and share one generate() call.
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):
            groups.setdefault(json.dumps(a[1], sort_keys=True, default=str), []).append(i)
        chunks = []
        for idx in groups.values():
            idx.sort(key=lambda i: (-len(self.tok_encode(args[i][0])), args[i][0]))
            for s in range(0, len(idx), self.batch_size):
                chunks.append([(i, args[i]) for i in idx[s : s + self.batch_size]])
        pbar = tqdm(total=len(chunks), disable=(self.rank != 0), desc="pumer_llava generate")

        def run(items):
            gen_kwargs = dict(items[0][1])
            out = self._generate_batch(items, gen_kwargs)
            pbar.update(1)
            return out

        try:
            answers = self._run_batches(chunks, len(requests), run)
        finally:
            pbar.close()
            self._flush_stats()
        res = []
        for i, a in enumerate(args):
            text = answers.get(i)
            res.append("" if text is None else text)  # a counted, logged failure
            self.cache_hook.add_partial("generate_until", (a[0], a[1]), res[-1])
        return res

    # loglikelihood --------------------------------------------------------------------------

    def _continuation_ids(self, prompt: str, continuation: str) -> list[int]:
        """The continuation's token ids as the tokenizer splits ``prompt + continuation``."""
        tok = self._tokenizer
        ctx = tok(prompt, add_special_tokens=True)["input_ids"]
        full = tok(prompt + continuation, add_special_tokens=True)["input_ids"]
        if len(full) <= len(ctx) or full[: len(ctx)] != ctx:
            raise ValueError(f"the continuation {continuation!r} does not tokenize as an extension of the prompt")
        return full[len(ctx):]

    def _loglikelihood_context(self, items: list[tuple]) -> list[tuple[float, bool]]:
        """Every continuation of one context: the context (and its image) is encoded and reduced
        once; each continuation is scored from a copy of that reduced KV cache, so every choice
        is scored on the same kept visual tokens. Returns (loss, greedy) per continuation: the
        mean negative log-likelihood of its tokens (what lmms-eval's own ``llava_hf`` returns,
        and what its multiple-choice ranking expects: the lowest value wins)."""
        import copy

        import torch

        context, _, doc_to_visual, doc_id, task, split = items[0]
        doc = self._doc(task, split, doc_id)
        vis = [v.convert("RGB") if hasattr(v, "convert") else v for v in flatten_visuals(doc_to_visual(doc))]
        prompt = build_prompt(context, len(vis), self._processor, self.chat_template)
        conts = []
        for _, target, *_ in items:
            continuation = target if isinstance(target, str) else target(doc)
            if isinstance(continuation, list):
                continuation = continuation[0]
            conts.append(self._continuation_ids(prompt, continuation))
        ctx = self._cast(self._encode([prompt], vis))
        n_ctx = ctx["input_ids"].shape[1]
        dev = ctx["input_ids"].device
        with torch.inference_mode():
            out = self._model(**ctx, use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1].float()  # (1, V): the prediction of each continuation's first token
            self.stats.add_batch([sample_id(task, split, doc_id)], self._visual_counts(ctx["input_ids"]),
                                 self._last_stats(), "loglikelihood")
            k, c_max = len(conts), max(len(c) for c in conts)
            pad = self._tokenizer.pad_token_id or 0
            ids = torch.full((k, c_max), pad, dtype=torch.long, device=dev)
            for i, c in enumerate(conts):  # right-padded: padding comes after what is scored
                ids[i, : len(c)] = torch.tensor(c, device=dev)
            cache = copy.deepcopy(out.past_key_values) if k > 1 else out.past_key_values
            if k > 1:
                cache.batch_repeat_interleave(k)
            # no attention mask: the context has no padding and each choice's padding comes after it,
            # so causal attention is exact; the model then places the choice right after the cache
            # (Qwen-VL's M-RoPE positions included, which a full-length mask would misplace)
            logits = self._model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        res = []
        for i, c in enumerate(conts):
            pred = torch.cat([first, logits[i, : len(c) - 1].float()])  # (C, V)
            logp = torch.log_softmax(pred, dim=-1)
            target = torch.tensor(c, device=logp.device)
            nll = -logp.gather(-1, target[:, None]).mean().item()
            res.append((nll, bool((logp.argmax(-1) == target).all())))
        return res

    def loglikelihood(self, requests) -> list:
        """Continuations of one context share one encoding of it (up to ``batch_size`` per forward).

        Each answer is wrapped in lmms-eval's ``GenerationResult``: its evaluator passes that
        object's value through as it is, while any other non-string output becomes its text
        (a ``(loss, greedy)`` tuple would reach the task as a string). A failed request gets
        ``(inf, False)``: counted, logged, and never the lowest loss, so never the chosen answer.
        """
        from tqdm import tqdm

        args = [req.args for req in requests]
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(args):
            groups.setdefault((a[0], a[3], a[4], a[5]), []).append(i)
        chunks = []
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunks.append([(i, args[i]) for i in idx[s : s + self.batch_size]])
        pbar = tqdm(total=len(chunks), disable=(self.rank != 0), desc="pumer_llava loglikelihood")

        def run(items):
            out = self._loglikelihood_context(items)
            pbar.update(1)
            return out

        try:
            answers = self._run_batches(chunks, len(requests), run)
        finally:
            pbar.close()
            self._flush_stats()
        res = [(math.inf, False) if answers.get(i) is None else answers[i] for i in range(len(args))]
        return [_result(r) for r in res]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "pumer_llava does not implement generate_until_multi_round (multi-round tasks); "
            "evaluate single-round tasks, or open an issue if you need it"
        )


def manifest():
    """The ``lmms_eval.models`` entry point: registers ``--model pumer_llava``."""
    if ModelManifest is None:  # pragma: no cover
        raise ImportError("lmms-eval is not installed")
    return ModelManifest(model_id="pumer_llava", simple_class_path="pumer_llava.lmms_eval_plugin.PumerLlava")
