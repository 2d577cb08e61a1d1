"""pumer-bench: speed and memory of a reduced vs. unreduced vision-language model, measured in one run.

    pumer-bench                                             # llava-1.5-7b-scaled on this machine
    pumer-bench --model llava-1.5-7b --device cuda --dtype fp16 --attn sdpa --batch-sizes 1,8,32
    pumer-bench --model path/to/llava-1.5-7b-hf --load-in-4bit
    pumer-bench --model tiny --methods pumer,fastv --fractions 1,0.25 --batch-sizes 1,2 --repeats 2

``--model`` is a folder (``from_pretrained``) or a preset of :mod:`pumer_llava.presets`
built with random weights. Inputs are synthetic: random text before and after one image's
visual tokens; a preset's are LLaVA-1.5-shaped with random pixels, a folder's image (random
pixels, ``--image-size``) is encoded by its processor, so every adapter row gets its own
counts and pixel inputs. Every generation makes exactly ``--new-tokens`` tokens (EOS off).

What is measured, for the unpatched model ("none") and every method x kept fraction:

- prefill latency (time to first token: one forward that fills the cache) at batch 1, and
  the part of it spent in the language model and in token selection;
- per batch size: end-to-end generation throughput (samples/s), decode tokens/s (after the
  first token) and time to first token inside ``generate``;
- the KV cache after generation (sum of key/value tensor bytes; reduced layers hold fewer
  tokens) and peak memory (see below);
- the FLOPs-predicted speedup next to the measured one: the FLOPs one prefill ran, counted
  (:func:`pumer_llava.counting.flop_counter`), in all and inside the language model; and the
  decoder formula's ``1 / last_stats.flops_ratio``;
- per prefill and per decode step: ATen operators, device kernels and host syncs
  (:mod:`pumer_llava.counting`), reduced vs unreduced.

How it measures (as ToMe's ``benchmark()``): warm-up runs are discarded;
on CUDA the clock is read after ``torch.cuda.synchronize()``; every number is a median
over repeats; reduced and unreduced runs alternate in the same process. Each repeat
walks one group per method, ``[none, method@f1, method@f2, ...]`` (fraction order flipped
on odd repeats), and a ratio is the median over repeats of the ratio to the unreduced run
of the same group, so slow drifts of a shared machine cancel.

Peak memory: on CUDA, ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus
what was allocated before (weights), per run. On any device also the peak of live tensor
bytes allocated during one untimed generate, counted by a dispatch mode
(:class:`PeakTensorMemory`): the same quantity as CUDA's allocator peak, per config, in
the same process. Process RSS is not used: its peak is process-wide and monotonic (the
first large run fixes it for all later ones) and includes allocator caching; a subprocess
per config would rebuild the model each time and still mix weights and allocator slack
into the number. The process's peak RSS is recorded once in ``env`` for reference.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .. import __version__, apply_pumer, remove_pumer
from ..config import parse_options
from ..hooks import get_adapter
from ..presets import PRESETS, build_preset, get_preset
from ..counting import kv_cache_bytes
from ..reduce import decoder_flops

SCHEMA = "pumer-bench/1"
NONE = "none"  # the unpatched model
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEFAULT_PREFIX, _DEFAULT_SUFFIX = 36, 18  # LLaVA-1.5 template around the image


@dataclass
class BenchSpec:
    """Everything a run depends on; stored in the JSON as ``config``."""

    model: str = "llava-1.5-7b-scaled"
    methods: tuple[str, ...] = ("pumer", "fastv", "random")
    fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.11)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    dtype: str = "auto"  # fp16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False
    attn: str = "sdpa"
    device: str = "auto"
    repeats: int = 5  # timed prefill repeats per config
    gen_repeats: int = 3  # timed generate repeats per config and batch size
    warmup: int = 1  # discarded rounds (prefill) / runs per method group (generate)
    new_tokens: int = 16
    prefix_tokens: int | None = None  # text tokens before the image; preset's by default
    suffix_tokens: int | None = None  # after it
    threads: int | None = None
    memory: bool = True
    seed: int = 0
    cache: str = "dynamic"  # generate()'s KV cache: dynamic, or static (preallocated)
    compile: bool = False  # compile generate()'s decoding forward (static cache only)
    image_size: tuple[int, int] | None = None  # (width, height) of the image a folder's processor encodes
    options: dict[str, str] = field(default_factory=dict)  # methods' own options (--option KEY=VALUE)
    layers: tuple[int, ...] | None = None  # every method's reducing layers (default: each method's own)

    def method_kwargs(self, method: str) -> dict[str, Any]:
        """The options ``method`` runs with: each --option it takes, and the run's seed if it has one."""
        from ..methods import get_method

        opts = get_method(method).options
        names = opts.names()
        text = {k: v for k, v in self.options.items() if k in names}
        if "seed" in names and "seed" not in text:
            text["seed"] = str(self.seed)
        return opts.parse(method, text).to_dict()

    def resolved_device(self) -> torch.device:
        from ..loading import resolve_device

        return resolve_device(self.device)

    def resolved_dtype(self) -> str:
        """The short name (fp32, fp16, bf16) of ``dtype``, which takes either spelling."""
        if self.dtype != "auto":
            from ..loading import DTYPE_NAMES, DTYPES as ANY

            key = str(self.dtype).lower()
            if key not in ANY:
                raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
            return next(k for k, v in DTYPES.items() if v == ANY[key])
        return "fp16" if self.resolved_device().type == "cuda" else "fp32"

    def validate(self) -> None:
        for f in self.fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"kept fraction {f} is outside (0, 1]")
        if not self.methods:
            raise ValueError("no method to benchmark")
        from ..methods import get_method

        for m in self.methods:
            get_method(m)
        taken = {n for m in self.methods for n in get_method(m).options.names()}
        stray = sorted(set(self.options) - taken)
        if stray:
            raise ValueError(f"--option {', '.join(stray)}: no benchmarked method takes it (they take: "
                             f"{', '.join(sorted(taken)) or 'nothing'})")
        for m in self.methods:
            self.method_kwargs(m)
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"image size must be WIDTHxHEIGHT in pixels, got {self.image_size}")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be dynamic or static, got {self.cache!r}")
        if self.compile and self.cache != "static":
            raise ValueError("compiled decoding needs the static cache (--cache static): generate() compiles its "
                             "decoding forward only over a preallocated cache")
        if self.repeats < 1 or self.gen_repeats < 0 or self.warmup < 0 or self.new_tokens < 2:
            raise ValueError("need repeats >= 1, gen_repeats >= 0, warmup >= 0 and new_tokens >= 2")
        self.resolved_dtype()


# ----------------------------------------------------------------------------- measuring


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated while active (and still alive at that moment).

    Views and in-place results (outputs that alias an input) are not new memory; storages
    that existed before (weights, inputs) are never counted. Buffers private to one fused
    kernel are not seen. It slows every op down: use it for untimed runs only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = getattr(func, "_schema", None)
        if schema is not None and all(r.alias_info is not None for r in schema.returns):
            return out  # views and in-place ops
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                s = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = id(s)
            if key in self._sizes:
                continue
            self._sizes[key] = s.nbytes()
            weakref.finalize(s, self._release, key)
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
        return out


class _StepClock:
    """LogitsProcessor that reads the clock after every forward of ``generate``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(_now(self.device))
        return scores


class _LLMClock:
    """Times the language model's forward (the decoder stack: what reduction shortens)."""

    def __init__(self, model, device: torch.device) -> None:
        lm = get_adapter(model).language_model(model)
        self.device = device
        self.t0 = self.seconds = 0.0
        self.handles = [
            lm.register_forward_pre_hook(lambda *a: self._start()),
            lm.register_forward_hook(lambda *a: self._stop()),
        ]

    def _start(self) -> None:
        if not torch.compiler.is_compiling():  # it times the eager prefill, not a compiled decode step
            self.t0 = _now(self.device)

    def _stop(self) -> None:
        if not torch.compiler.is_compiling():
            self.seconds = _now(self.device) - self.t0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _CudaPeak:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        pass

    @property
    def peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - self.base)


# ----------------------------------------------------------------------------- model and inputs


def load_model(spec: BenchSpec):
    """``(model, processor or None)`` of ``spec`` on its device, eval mode, greedy generation with EOS off.

    A preset has no processor: its prompts hold LLaVA-1.5's fixed visual-token count. A folder
    comes with its processor, which encodes the benchmark's image (any adapter row); a folder
    without one works only where the count is fixed.
    """
    device, dtype = spec.resolved_device(), DTYPES[spec.resolved_dtype()]
    path = spec.model
    if path in PRESETS:
        _check_fits(spec, device, dtype)
        if not spec.load_in_4bit:
            return build_preset(path, dtype=dtype, attn=spec.attn, device=device, seed=spec.seed), None
        # bitsandbytes quantizes while loading: go through a saved copy of the random weights
        tmp = tempfile.TemporaryDirectory(prefix="pumer-bench-")
        build_preset(path, dtype=dtype, attn=spec.attn, device="cpu", seed=spec.seed).save_pretrained(tmp.name)
        model, _ = _from_pretrained(tmp.name, spec, device, dtype, processor=False)
        model._pumer_bench_tmp = tmp  # keep the folder as long as the model
        return model, None
    if not Path(path).is_dir():
        raise ValueError(f"--model {path!r} is neither a folder nor a preset; presets: {', '.join(sorted(PRESETS))}")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"--model {path}: not a model folder (it has no config.json); presets: {', '.join(sorted(PRESETS))}")
    return _from_pretrained(path, spec, device, dtype)


def _check_fits(spec: BenchSpec, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a preset whose weights alone exceed the device's memory (e.g. the 7B on a laptop)."""
    with torch.device("meta"):
        params = sum(p.numel() for p in build_preset(spec.model, dtype=dtype, attn=spec.attn, device="meta").parameters())
    need = params * (0.55 if spec.load_in_4bit else torch.finfo(dtype).bits / 8)
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
    if need > 0.9 * have:
        raise ValueError(
            f"preset {spec.model!r} has {params / 1e9:.1f}B parameters, {need / 2**30:.1f} GiB of weights in "
            f"{spec.resolved_dtype()}{' 4-bit' if spec.load_in_4bit else ''}, more than this {device.type} holds "
            f"({have / 2**30:.1f} GiB): use a GPU (--device cuda --dtype fp16), --load-in-4bit, or a scaled preset"
        )


def _from_pretrained(path: str, spec: BenchSpec, device: torch.device, dtype: torch.dtype, processor: bool = True):
    from ..loading import adapter_for, load_model as load, load_processor, read_config

    config = read_config(path)[0]
    adapter = adapter_for(config)
    fixed = adapter.visual_tokens_per_image(config) is not None
    proc = None
    if processor:
        try:
            proc = load_processor(path, adapter)
        except ValueError as exc:
            if not fixed:
                raise ValueError(f"{exc}: pumer-bench encodes its image with the folder's processor, since "
                                 f"{adapter.class_name}'s visual tokens per image depend on the image") from None
    model, _, adapter = load(path, device=device, dtype=dtype, quant="4bit" if spec.load_in_4bit else None,
                             attn=spec.attn, device_map=str(device), processor=False)
    gen = model.generation_config
    text = adapter.text_config(model.config)
    if gen.pad_token_id is None:
        gen.pad_token_id = text.pad_token_id if text.pad_token_id is not None else 0
    gen.eos_token_id = None
    gen.do_sample = False
    return model, proc


def _prompt_lengths(spec: BenchSpec) -> tuple[int, int]:
    if spec.model in PRESETS:
        p = get_preset(spec.model)
        prefix, suffix = p.prompt_prefix, p.prompt_suffix
    else:
        prefix, suffix = _DEFAULT_PREFIX, _DEFAULT_SUFFIX
    return (spec.prefix_tokens if spec.prefix_tokens is not None else prefix,
            spec.suffix_tokens if spec.suffix_tokens is not None else suffix)


def make_inputs(model, batch: int, prefix: int, suffix: int, seed: int = 0, processor=None,
                image_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``batch`` equal prompts ``prefix text, visual tokens, suffix text`` (no padding).

    With a processor, one random image of ``image_size`` (width, height; default the tower's
    square input, else 448) is encoded by it, so every adapter row gets the visual tokens and
    the pixel inputs (crops, grids, M-RoPE token types) its model expects. Without one, the
    row must have a fixed count per image (LLaVA-1.5): its placeholders and random pixels.
    Text tokens are random ids that are neither special nor visual.
    """
    adapter = get_adapter(model)
    cfg = model.config
    text = adapter.text_config(cfg)
    visual = set(adapter.visual_token_ids(cfg))
    g = torch.Generator().manual_seed(seed)
    param = next(p for p in model.parameters() if p.is_floating_point())
    if processor is not None:
        enc = _encode_image(processor, cfg, batch, g, image_size)
    else:
        n_vis = adapter.visual_tokens_per_image(cfg)
        if n_vis is None:
            raise ValueError(f"{adapter.class_name}'s visual tokens per image depend on the image: "
                             "pumer-bench needs the model folder's processor to encode one")
        vc = cfg.vision_config
        channels = getattr(vc, "num_channels", 3)
        enc = {"input_ids": torch.full((batch, n_vis), min(visual)),
               "pixel_values": torch.randn(batch, channels, vc.image_size, vc.image_size, generator=g)}
    special = visual | {t for t in (text.pad_token_id, text.bos_token_id, text.eos_token_id) if t is not None}
    if processor is not None:
        special |= set(processor.tokenizer.all_special_ids)
    allowed = torch.ones(text.vocab_size, dtype=torch.bool)
    allowed[[t for t in special if 0 <= t < text.vocab_size]] = False
    allowed[: min(16, text.vocab_size)] = False  # low ids are specials in most vocabularies
    pool = allowed.nonzero()[:, 0]
    pre = pool[torch.randint(len(pool), (batch, prefix), generator=g)]
    if prefix and text.bos_token_id is not None:
        pre[:, 0] = text.bos_token_id
    post = pool[torch.randint(len(pool), (batch, suffix), generator=g)]
    ids = enc.pop("input_ids")
    vis = torch.isin(ids, torch.tensor(sorted(visual)))
    runs = [row[m] for row, m in zip(ids, vis)]  # each row's visual tokens, the processor's text dropped
    out = {"input_ids": torch.cat([pre, torch.stack(runs), post], dim=1)}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    types = enc.pop("mm_token_type_ids", None)
    enc.pop("attention_mask", None)
    if types is not None:  # Qwen-VL's M-RoPE: text 0, image 1, video 2
        kinds = torch.stack([row[m] for row, m in zip(types, vis)])
        zeros = torch.zeros_like
        out["mm_token_type_ids"] = torch.cat([zeros(pre), kinds.to(pre.dtype), zeros(post)], dim=1)
    out.update(enc)
    for k, v in out.items():
        if torch.is_tensor(v) and v.is_floating_point():
            out[k] = v.to(param.dtype)
    return {k: v.to(param.device) if torch.is_tensor(v) else v for k, v in out.items()}


def _encode_image(processor, config, batch: int, g: torch.Generator, image_size) -> dict[str, torch.Tensor]:
    from PIL import Image

    side = getattr(config.vision_config, "image_size", None) or 448
    width, height = image_size or (side, side)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    token = getattr(processor, "image_token", None) or getattr(processor.tokenizer, "image_token", None)
    if token is None:
        raise ValueError(f"{type(processor).__name__} names no image token: pumer-bench cannot place its image")
    enc = processor(images=[image] * batch, text=[token] * batch, return_tensors="pt")
    return dict(enc)


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Setting:
    method: str  # NONE = unpatched
    fraction: float

    @property
    def key(self) -> str:
        return f"{self.method}@{self.fraction:g}"


def _switch(model, s: Setting, spec: BenchSpec) -> None:
    if s.method == NONE:
        remove_pumer(model)
    else:
        apply_pumer(model, ratio=s.fraction, method=s.method, layers=spec.layers, **spec.method_kwargs(s.method))


def _prefill(model, inputs, device, llm_clock: _LLMClock) -> dict[str, Any]:
    gc.collect()
    with torch.inference_mode(), _CudaPeak(device) as cp:
        t0 = _now(device)
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        t1 = _now(device)
    stats = model.pumer.last_stats if "pumer" in model.__dict__ else None
    kv, tokens = kv_cache_bytes(out.past_key_values)  # keep numbers, never the cache itself
    return {
        "seconds": t1 - t0,
        "llm_seconds": llm_clock.seconds,
        "select_seconds": stats.select_seconds if stats is not None else 0.0,
        "stats": stats,
        "kv_cache_bytes": kv,
        "kv_tokens_per_layer": tokens,
        "cuda_peak": cp.peak,
    }


def _op_counts(model, inputs) -> dict[str, int]:
    """Operators, kernels and host syncs of one prefill and of the decode step after it
    (:mod:`pumer_llava.counting`), untimed. The prompt was run before, so its plans are reused,
    as in any repeated measurement."""
    from ..counting import OpCounter

    with torch.inference_mode():
        with OpCounter() as pre:
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        # the prompts have no padding, so no mask: the model places the token after the cache
        # (a full-length mask would misplace Qwen-VL's M-RoPE positions)
        with OpCounter() as dec:
            model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return {
        "prefill_ops": pre.ops, "prefill_kernels": pre.kernels, "prefill_syncs": pre.syncs,
        "decode_ops": dec.ops, "decode_kernels": dec.kernels, "decode_syncs": dec.syncs,
    }


def _flop_counts(model, inputs) -> dict[str, int]:
    """FLOPs one prefill runs (:func:`pumer_llava.counting.flop_counter`), in all and inside the
    language model (the span ``_LLMClock`` times), untimed."""
    from ..counting import flop_counter

    lm = get_adapter(model).language_model(model)
    with torch.inference_mode(), flop_counter() as f:
        span = []
        handles = [lm.register_forward_pre_hook(lambda *a: span.append(f.get_total_flops())),
                   lm.register_forward_hook(lambda *a: span.append(f.get_total_flops()))]
        try:
            model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
    return {"prefill_flops_counted": f.get_total_flops(), "llm_flops_counted": span[-1] - span[0]}


def _compile_config(device):
    from transformers import CompileConfig

    cfg = CompileConfig(fullgraph=True)
    cfg._compile_all_devices = device.type != "cuda"  # generate() compiles on its own only on accelerators
    return cfg


def _generate(model, inputs, new_tokens: int, device, cache: str = "dynamic", compile: bool = False) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    gc.collect()
    # compiled only when asked: a static cache on a GPU would otherwise compile on its own
    how = dict(disable_compile=False, compile_config=_compile_config(device)) if compile else dict(disable_compile=True)
    clock = _StepClock(device)
    with torch.inference_mode(), _CudaPeak(device) as cp:
        t0 = _now(device)
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            logits_processor=LogitsProcessorList([clock]),
            return_dict_in_generate=True,
            cache_implementation=None if cache == "dynamic" else cache,
            **how,
        )
        t1 = _now(device)
    bsz = inputs["input_ids"].shape[0]
    made = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    if made != new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(f"generate made {made} tokens ({len(clock.stamps)} steps), expected {new_tokens}")
    decode = clock.stamps[-1] - clock.stamps[0]
    kv, tokens = kv_cache_bytes(out.past_key_values)
    return {
        "total_seconds": t1 - t0,
        "ttft_seconds": clock.stamps[0] - t0,
        "decode_seconds": decode,
        "decode_tokens_per_s": bsz * (new_tokens - 1) / decode if decode > 0 else float("inf"),
        "samples_per_s": bsz / (t1 - t0),
        "kv_cache_bytes": kv,
        "kv_tokens_per_layer": tokens,
        "cuda_peak": cp.peak,
    }


def _tracked(fn):
    """Run ``fn()`` under :class:`PeakTensorMemory`; (its result, peak bytes)."""
    gc.collect()
    tracker = PeakTensorMemory()
    with tracker:
        res = fn()
    return res, tracker.peak


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------- the benchmark


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(a, b) -> float | None:
    return a / b if (a is not None and b) else None


def _env(device: torch.device, threads: int) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pumer_llava": __version__,
        "platform": platform.platform(),
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        env["device_name"] = env["cpu"]
    try:
        env["load_average_start"] = list(os.getloadavg())
    except OSError:
        pass
    env["git_commit"] = _git_commit()
    return env


def _git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when the package has local changes), if it is one."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here.parent)],
                               cwd=here, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_benchmark(spec: BenchSpec, model=None, progress: bool = True, processor=None) -> dict[str, Any]:
    """Run the benchmark described by ``spec`` and return the result (the JSON's content).

    ``model``: an already loaded model to use instead of ``spec.model`` (it is left without
    pumer hooks afterwards), with its ``processor`` where its visual-token count varies.
    """
    spec.validate()
    threads_before = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    import torch._dynamo.config as dynamo

    limit = dynamo.recompile_limit
    if spec.compile:  # one decoding graph per setting and batch size, all kept
        dynamo.recompile_limit = max(limit, (1 + len(spec.methods) * len(spec.fractions)) * len(spec.batch_sizes) + 2)
    try:
        return _run(spec, model, processor, progress)
    finally:
        torch.set_num_threads(threads_before)
        dynamo.recompile_limit = limit


def _run(spec: BenchSpec, model, processor, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    device = spec.resolved_device()
    if model is None:
        model, processor = load_model(spec)
    else:
        device = next(model.parameters()).device
    remove_pumer(model)
    adapter = get_adapter(model)
    text = adapter.text_config(model.config)
    n_layers = len(adapter.layers(model))
    prefix, suffix = _prompt_lengths(spec)

    def inputs_for(batch: int, seed: int) -> dict[str, torch.Tensor]:
        return make_inputs(model, batch, prefix, suffix, seed, processor, spec.image_size)

    from ..loading import count_visual_tokens

    inputs1 = inputs_for(1, spec.seed)  # the prefill's prompt; it also fixes the visual-token count
    n_vis = count_visual_tokens(adapter, model.config, inputs1["input_ids"])[0]

    settings = [Setting(NONE, 1.0)] + [Setting(m, f) for m in spec.methods for f in spec.fractions]
    for s in settings[1:]:  # validate every setting before any timing
        _switch(model, s, spec)
    remove_pumer(model)

    def schedule(r: int) -> list[tuple[str, Setting]]:
        order = list(spec.fractions) if r % 2 == 0 else list(reversed(spec.fractions))
        out = []
        for m in spec.methods:
            out.append((m, settings[0]))
            out += [(m, Setting(m, f)) for f in order]
        return out

    per_round = len(schedule(0))
    n_gen_warm = spec.warmup * (len(settings) if spec.compile else len(spec.methods) * 2)
    # one bar per phase (prefill, then each batch size's generations): a phase's runs take
    # alike, so its ETA, from the runs it measured, holds; one bar over all of them would
    # extrapolate the fast prefill runs to the slow generations
    prefill_runs = (spec.warmup + spec.repeats) * per_round + (len(settings) if spec.memory else 0)
    gen_runs = n_gen_warm + spec.gen_repeats * per_round + (len(settings) if spec.memory else 0)
    bar = tqdm(total=prefill_runs, desc="pumer-bench prefill", disable=not progress, unit="run", file=sys.stderr)
    llm_clock = _LLMClock(model, device)
    env = _env(device, torch.get_num_threads())  # load average before the run
    started = time.perf_counter()
    # Everything alive now (torch, transformers, the weights) moves to the GC's permanent
    # generation: the gc.collect() before each run then costs microseconds instead of ~0.5 s,
    # and no full collection can land inside a timed run.
    gc.collect()
    gc.freeze()
    prefill_rows: list[dict] = []
    gen_rows: list[dict] = []
    interrupted = False
    try:
        # ---- prefill at batch 1
        pre: dict[str, list[dict]] = {s.key: [] for s in settings}
        pre_base: dict[tuple[int, str], float] = {}
        for r in range(spec.warmup + spec.repeats):
            for group, s in schedule(r):
                bar.set_postfix_str(f"prefill {s.key}", refresh=False)
                _switch(model, s, spec)
                res = _prefill(model, inputs1, device, llm_clock)
                bar.update()
                if r < spec.warmup:
                    continue
                res.update(repeat=r, group=group)
                if s.method == NONE:
                    pre_base[(r, group)] = res["seconds"]
                    res["llm_base"] = res["llm_seconds"]
                pre[s.key].append(res)
        prefill_rows = _prefill_rows(model, spec, settings, pre, pre_base, inputs1, n_vis, device, bar)

        # ---- generation per batch size
        for i, bsz in enumerate(spec.batch_sizes):
            bar.reset(total=gen_runs)
            bar.set_description(f"pumer-bench generate b={bsz} ({i + 1}/{len(spec.batch_sizes)})", refresh=False)
            gen_rows += _generation_rows(model, spec, settings, schedule, inputs_for(bsz, spec.seed + bsz), device, bar,
                                         n_gen_warm)
    except KeyboardInterrupt:  # Ctrl-C: keep what finished (the prefill table, whole batch sizes)
        interrupted = True
    finally:
        gc.unfreeze()
        llm_clock.remove()
        remove_pumer(model)
        bar.close()

    env["peak_rss_bytes_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        env["load_average_end"] = list(os.getloadavg())
    except OSError:
        pass
    config = asdict(spec)
    config.update(
        dtype=spec.resolved_dtype(),
        device=str(device),
        prefix_tokens=prefix,
        suffix_tokens=suffix,
        visual_tokens=n_vis,
        prompt_tokens=int(inputs1["input_ids"].shape[1]),
        text_hidden=text.hidden_size,
        text_layers=n_layers,
        text_mlp=text.intermediate_size,
        text_heads=text.num_attention_heads,
        vocab=text.vocab_size,
        preset=get_preset(spec.model).description if spec.model in PRESETS else None,
        params=sum(p.numel() for p in model.parameters()),
    )
    result = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - started,
        "env": env,
        "config": config,
        "prefill": prefill_rows,
        "generation": gen_rows,
        "interrupted": interrupted,
    }
    result["summary"] = summarize(result)
    return result


def _prefill_rows(model, spec, settings, pre, pre_base, inputs1, n_vis, device, bar) -> list[dict]:
    rows = []
    base_key = settings[0].key
    base_med = _median([x["seconds"] for x in pre[base_key]])
    base_llm = _median([x["llm_seconds"] for x in pre[base_key]])
    for s in settings:
        runs = pre[s.key]
        secs = [x["seconds"] for x in runs]
        llm = [x["llm_seconds"] for x in runs]
        paired = [pre_base[(x["repeat"], x["group"])] / x["seconds"] for x in runs]
        llm_base = {(x["repeat"], x["group"]): x["llm_seconds"] for x in pre[base_key]}
        llm_paired = [llm_base[(x["repeat"], x["group"])] / x["llm_seconds"] for x in runs]
        stats = runs[-1]["stats"]
        if stats is not None:
            flops, flops_full, layers = stats.flops, stats.flops_unreduced, stats.reducing_layers
            kept = stats.visual_tokens_final[0]
            vis_layers = [v[0] for v in stats.visual_tokens_per_layer]
        else:  # the unpatched model: same formula, every layer sees every token
            n = int(inputs1["attention_mask"][0].sum())
            t = get_adapter(model).text_config(model.config)
            flops = flops_full = decoder_flops([n] * len(get_adapter(model).layers(model)), t.hidden_size,
                                               t.intermediate_size)
            layers = []
            kept = n_vis
            vis_layers = [kept] * len(get_adapter(model).layers(model))
        flops_speedup = flops_full / flops
        speedup = _median(paired)
        llm_speedup = _median(llm_paired)
        row = {
            "method": s.method,
            "fraction": s.fraction,
            "batch_size": 1,
            "visual_tokens_kept": kept,
            "visual_tokens_per_layer": vis_layers,
            "reducing_layers": layers,
            "prefill_seconds": _median(secs),
            "prefill_samples": secs,
            "llm_seconds": _median(llm),
            "speedup": speedup,
            "speedup_of_medians": _ratio(base_med, _median(secs)),
            "llm_speedup": llm_speedup,
            "llm_speedup_of_medians": _ratio(base_llm, _median(llm)),
            "flops": flops,
            "flops_unreduced": flops_full,
            "flops_ratio": flops / flops_full,
            "flops_speedup": flops_speedup,
            "speedup_vs_predicted": speedup / flops_speedup,
            "llm_speedup_vs_predicted": llm_speedup / flops_speedup,
            "select_seconds": _median([x["select_seconds"] for x in runs]),
            "select_share": _median([x["select_seconds"] / x["seconds"] for x in runs]),
            "select_share_of_llm": _median([x["select_seconds"] / x["llm_seconds"] for x in runs]),
            "cuda_peak_bytes": max((x["cuda_peak"] for x in runs if x["cuda_peak"] is not None), default=None),
        }
        row.update(kv_cache_bytes=runs[-1]["kv_cache_bytes"], kv_tokens_per_layer=runs[-1]["kv_tokens_per_layer"])
        _switch(model, s, spec)
        row.update(_op_counts(model, inputs1))
        _switch(model, s, spec)
        row.update(_flop_counts(model, inputs1))
        if spec.memory:
            _switch(model, s, spec)
            bar.set_postfix_str(f"memory prefill {s.key}", refresh=False)
            (_, peak) = _tracked(lambda: _prefill(model, inputs1, device, _NullClock()))
            bar.update()
            row["peak_tensor_bytes"] = peak
        rows.append(row)
    base = rows[0]
    for row in rows:
        for k in ("prefill_ops", "prefill_kernels", "decode_ops", "decode_kernels"):
            row[f"{k}_ratio"] = _ratio(row[k], base[k])
        # the prediction from the FLOPs each prefill counted, tower and gated MLP included
        row["counted_speedup"] = _ratio(base["prefill_flops_counted"], row["prefill_flops_counted"])
        row["llm_counted_speedup"] = _ratio(base["llm_flops_counted"], row["llm_flops_counted"])
        row["speedup_vs_counted"] = _ratio(row["speedup"], row["counted_speedup"])
        row["llm_speedup_vs_counted"] = _ratio(row["llm_speedup"], row["llm_counted_speedup"])
        row["kv_ratio"] = _ratio(row["kv_cache_bytes"], base["kv_cache_bytes"])
        row["peak_ratio"] = _ratio(row.get("peak_tensor_bytes"), base.get("peak_tensor_bytes"))
    return rows


class _NullClock:
    seconds = 0.0


def _generation_rows(model, spec, settings, schedule, inputs, device, bar, n_warm) -> list[dict]:
    bsz = inputs["input_ids"].shape[0]
    runs: dict[str, list[dict]] = {s.key: [] for s in settings}
    base: dict[tuple[int, str], dict] = {}
    try:
        warm = [(m, s) for m in spec.methods for s in (settings[0], Setting(m, min(spec.fractions)))]
        if spec.compile:  # every setting compiles its own decoding graph (its layers hold their own slots)
            warm = [(s.method, s) for s in settings]
        for _ in range(spec.warmup):
            for _, s in warm:
                bar.set_postfix_str(f"warm-up b={bsz} {s.key}", refresh=False)
                _switch(model, s, spec)
                _generate(model, inputs, spec.new_tokens, device, spec.cache, spec.compile)
                bar.update()
        for r in range(spec.gen_repeats):
            for group, s in schedule(r):
                bar.set_postfix_str(f"generate b={bsz} {s.key}", refresh=False)
                _switch(model, s, spec)
                res = _generate(model, inputs, spec.new_tokens, device, spec.cache, spec.compile)
                res.update(repeat=r, group=group)
                if s.method == NONE:
                    base[(r, group)] = res
                runs[s.key].append(res)
                bar.update()
    except Exception as exc:  # noqa: BLE001 - an OOM at a large batch skips that batch size only
        if not _is_oom(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [{"method": s.method, "fraction": s.fraction, "batch_size": bsz, "skipped": f"out of memory: {exc}"}
                for s in settings]
    rows = []
    for s in settings:
        rs = runs[s.key]
        row: dict[str, Any] = {"method": s.method, "fraction": s.fraction, "batch_size": bsz,
                               "new_tokens": spec.new_tokens}
        if rs:
            pair = [(base[(x["repeat"], x["group"])], x) for x in rs]
            row.update(
                total_seconds=_median([x["total_seconds"] for x in rs]),
                total_samples=[x["total_seconds"] for x in rs],
                ttft_seconds=_median([x["ttft_seconds"] for x in rs]),
                decode_tokens_per_s=_median([x["decode_tokens_per_s"] for x in rs]),
                samples_per_s=_median([x["samples_per_s"] for x in rs]),
                throughput_ratio=_median([b["total_seconds"] / x["total_seconds"] for b, x in pair]),
                decode_ratio=_median([x["decode_tokens_per_s"] / b["decode_tokens_per_s"] for b, x in pair]),
                ttft_speedup=_median([b["ttft_seconds"] / x["ttft_seconds"] for b, x in pair]),
                cuda_peak_bytes=max((x["cuda_peak"] for x in rs if x["cuda_peak"] is not None), default=None),
            )
            row.update(kv_cache_bytes=rs[-1]["kv_cache_bytes"], kv_tokens_per_layer=rs[-1]["kv_tokens_per_layer"])
        if spec.memory:
            _switch(model, s, spec)
            bar.set_postfix_str(f"memory b={bsz} {s.key}", refresh=False)
            res, peak = _tracked(lambda: _generate(model, inputs, spec.new_tokens, device, spec.cache, spec.compile))
            bar.update()
            row["peak_tensor_bytes"] = peak
            row.setdefault("kv_cache_bytes", res["kv_cache_bytes"])
            row.setdefault("kv_tokens_per_layer", res["kv_tokens_per_layer"])
        rows.append(row)
    for row in rows:
        row["kv_ratio"] = _ratio(row.get("kv_cache_bytes"), rows[0].get("kv_cache_bytes"))
        row["peak_ratio"] = _ratio(row.get("peak_tensor_bytes"), rows[0].get("peak_tensor_bytes"))
    return rows


def summarize(result: dict) -> dict[str, Any]:
    """Per method at each fraction: the headline ratios (prefill, FLOPs, KV cache, ops, throughput)."""
    out: dict[str, Any] = {}
    for row in result["prefill"]:
        if row["method"] == NONE:
            continue
        entry = out.setdefault(row["method"], {}).setdefault(f"{row['fraction']:g}", {})
        entry.update(
            prefill_speedup=row["speedup"],
            flops_speedup=row["flops_speedup"],
            speedup_vs_predicted=row["speedup_vs_predicted"],
            counted_speedup=row.get("counted_speedup"),
            speedup_vs_counted=row.get("speedup_vs_counted"),
            llm_speedup_vs_counted=row.get("llm_speedup_vs_counted"),
            select_share=row["select_share"],
            kv_ratio=row["kv_ratio"],
            prefill_ops_ratio=row["prefill_ops_ratio"],
            prefill_syncs=row["prefill_syncs"],
            decode_ops_ratio=row["decode_ops_ratio"],
        )
    for row in result["generation"]:
        if row["method"] == NONE or "throughput_ratio" not in row:
            continue
        entry = out[row["method"]][f"{row['fraction']:g}"]
        entry[f"throughput_ratio_b{row['batch_size']}"] = row["throughput_ratio"]
        entry[f"decode_ratio_b{row['batch_size']}"] = row["decode_ratio"]
        entry[f"kv_ratio_b{row['batch_size']}"] = row["kv_ratio"]
    return out


# ----------------------------------------------------------------------------- reporting


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def to_markdown(result: dict) -> str:
    c, e = result["config"], result["env"]
    quant = ", 4-bit nf4" if c["load_in_4bit"] else ""
    lines = [
        f"## pumer-bench: {c['model']} on {e['device_name']} ({e['device']})",
        "",
        f"{c['dtype']}{quant}, attention {c['attn']}, {c.get('cache', 'dynamic')} KV cache"
        f"{', compiled decoding' if c.get('compile') else ''}, torch {e['torch']}, "
        f"transformers {e['transformers']}, "
        f"{e['torch_threads']} thread(s). Prompt: {c['prefix_tokens']} text + {c['visual_tokens']} visual + "
        f"{c['suffix_tokens']} text tokens; text model hidden {c['text_hidden']}, {c['text_layers']} layers, "
        f"MLP {c['text_mlp']}"
        + (f"; every method reduces at layers {', '.join(map(str, c['layers']))}" if c.get("layers") else "")
        + f". Medians of {c['repeats']} prefill / {c['gen_repeats']} generate repeats after "
        f"warm-up; ratios are medians of per-repeat ratios to the unreduced model run in the same group.",
        "",
        "### Prefill (time to first token), batch 1",
        "",
        "| method | kept | visual tokens | prefill ms | speedup | FLOPs-predicted | measured / predicted "
        "| LLM-only speedup | LLM-only / predicted | decoder formula | selection % of prefill "
        "| KV cache MB (ratio) | peak MB (ratio) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["prefill"]:
        lines.append(
            f"| {r['method']} | {r['fraction']:g} | {r['visual_tokens_kept']} | {r['prefill_seconds'] * 1e3:.0f} "
            f"| {_f(r['speedup'])} | {_f(r.get('counted_speedup'))} | {_f(r.get('speedup_vs_counted'), '{:.0%}')} "
            f"| {_f(r['llm_speedup'])} | {_f(r.get('llm_speedup_vs_counted'), '{:.0%}')} | {_f(r['flops_speedup'])} "
            f"| {_f(r['select_share'], '{:.1%}')} "
            f"| {_mb(r['kv_cache_bytes'])} ({_f(r['kv_ratio'])}) "
            f"| {_mb(r.get('peak_tensor_bytes'))} ({_f(r.get('peak_ratio'))}) |"
        )
    lines += [
        "",
        "### Operators, kernels and host syncs, batch 1",
        "",
        "| method | kept | prefill ops (ratio) | prefill kernels (ratio) | prefill syncs "
        "| decode-step ops (ratio) | decode-step kernels (ratio) | decode-step syncs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["prefill"]:
        if "prefill_ops" not in r:
            continue
        lines.append(
            f"| {r['method']} | {r['fraction']:g} | {r['prefill_ops']} ({_f(r['prefill_ops_ratio'])}) "
            f"| {r['prefill_kernels']} ({_f(r['prefill_kernels_ratio'])}) | {r['prefill_syncs']} "
            f"| {r['decode_ops']} ({_f(r['decode_ops_ratio'])}) | {r['decode_kernels']} ({_f(r['decode_kernels_ratio'])}) "
            f"| {r['decode_syncs']} |"
        )
    if result["generation"]:
        lines += [
            "",
            f"### Generation, {c['new_tokens']} new tokens",
            "",
            "| method | kept | batch | samples/s | throughput ratio | decode tok/s | decode ratio | TTFT ms "
            "| KV cache MB (ratio) | peak MB (ratio) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["generation"]:
            if "skipped" in r or "samples_per_s" not in r:
                lines.append(f"| {r['method']} | {r['fraction']:g} | {r['batch_size']} | {r.get('skipped', '-')} "
                             "| | | | | | |")
                continue
            lines.append(
                f"| {r['method']} | {r['fraction']:g} | {r['batch_size']} | {r['samples_per_s']:.3f} "
                f"| {_f(r['throughput_ratio'])} | {r['decode_tokens_per_s']:.1f} | {_f(r['decode_ratio'])} "
                f"| {r['ttft_seconds'] * 1e3:.0f} | {_mb(r.get('kv_cache_bytes'))} ({_f(r.get('kv_ratio'))}) "
                f"| {_mb(r.get('peak_tensor_bytes'))} ({_f(r.get('peak_ratio'))}) |"
            )
    lines += [
        "",
        "speedup: unreduced / reduced prefill time. FLOPs-predicted: unreduced / reduced FLOPs that one "
        "prefill ran, counted (matrix products, convolutions and attention: vision tower, projector, "
        "decoder and the reduction's scoring); measured / predicted is what the reduction's other costs "
        "(selection, gathers, launches) leave of it. LLM-only: the language model's forward alone, against "
        "the FLOPs counted inside it. Decoder formula: 1 / `last_stats.flops_ratio` (`4nd^2 + 2n^2d + "
        "2ndm` per layer: no tower, a two-matrix MLP, so it predicts more than a gated MLP gives). Peak MB: peak of "
        "live tensor bytes allocated during the call (weights excluded"
        + ("; CUDA `max_memory_allocated` in the JSON" if e["device"].startswith("cuda") else "")
        + "). KV cache: key/value bytes after the call. Ops: ATen operators dispatched; kernels: those "
        "that launch device work (views excluded); syncs: points where the host waits for the device "
        "(`.item()`, `.tolist()`, `nonzero`, ...). On a GPU each kernel costs a launch (microseconds) and "
        "each sync drains the stream, so for small models and decode steps these counts, not FLOPs, set the time.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["config"]
    methods = [m for m in c["methods"]]
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for m in methods:
        rows = sorted((r for r in result["prefill"] if r["method"] == m), key=lambda r: r["visual_tokens_kept"])
        x = [r["visual_tokens_kept"] for r in rows]
        ax.plot(x, [r["speedup"] for r in rows], "o-", color=colors[m], label=f"{m} measured")
        ax.plot(x, [r["flops_speedup"] for r in rows], "x--", color=colors[m], alpha=0.6, label=f"{m} FLOPs-predicted")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="visual tokens kept (of %d)" % c["visual_tokens"], ylabel="prefill speedup (x)",
           title="Prefill (TTFT), batch 1")
    ax.legend(fontsize=7)
    ax = axes[1]
    styles = ["o-", "s--", "^:", "d-."]
    for m in methods:
        for j, b in enumerate(c["batch_sizes"]):
            rows = sorted((r for r in result["generation"] if r["method"] == m and r["batch_size"] == b
                           and "throughput_ratio" in r), key=lambda r: r["fraction"])
            if rows:
                ax.plot([round(r["fraction"] * c["visual_tokens"]) for r in rows], [r["throughput_ratio"] for r in rows],
                        styles[j % len(styles)], color=colors[m], label=f"{m} batch {b}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="visual tokens kept (of %d)" % c["visual_tokens"], ylabel="throughput ratio (reduced / unreduced)",
           title=f"Generation throughput, {c['new_tokens']} new tokens")
    ax.legend(fontsize=7)
    ax = axes[2]
    for m in methods:
        rows = sorted((r for r in result["prefill"] if r["method"] == m), key=lambda r: r["visual_tokens_kept"])
        ax.plot([r["visual_tokens_kept"] for r in rows], [r["kv_ratio"] for r in rows], "o-", color=colors[m],
                label=f"{m} KV cache")
        if all(r.get("peak_ratio") is not None for r in rows):
            ax.plot([r["visual_tokens_kept"] for r in rows], [r["peak_ratio"] for r in rows], "x--", color=colors[m],
                    alpha=0.6, label=f"{m} peak memory")
    ax.set(xlabel="visual tokens kept (of %d)" % c["visual_tokens"], ylabel="reduced / unreduced",
           title="Memory after / during prefill, batch 1", ylim=(0, 1.1))
    ax.legend(fontsize=7)
    e = result["env"]
    fig.suptitle(f"pumer-bench {c['model']} ({c['dtype']}, {c['attn']}) on {e['device_name']} [{e['device']}]",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_prefix(result: dict) -> str:
    c = result["config"]
    dev = "cuda" if c["device"].startswith("cuda") else c["device"]
    quant = "-4bit" if c["load_in_4bit"] else ""
    name = Path(c["model"]).name if c["model"] not in PRESETS else c["model"]
    return f"speed_{dev}_{name}_{c['dtype']}{quant}"


def write_outputs(result: dict, prefix: str | Path, make_plot: bool = True) -> list[Path]:
    """``prefix``.json, .md and (with matplotlib) .png; returns the paths written."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = [prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")]
    out[0].write_text(json.dumps(result, indent=1) + "\n")
    out[1].write_text(to_markdown(result))
    if make_plot:
        out.append(plot(result, prefix.with_name(prefix.name + ".png")))
    return out


# ----------------------------------------------------------------------------- CLI


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _size(s: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {s!r} is not WIDTHxHEIGHT, e.g. 672x448") from None
    return w, h


def _strs(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    d = BenchSpec()
    p = argparse.ArgumentParser(
        prog="pumer-bench",
        description="Prefill latency, decode tokens/s, throughput, KV cache and peak memory of a vision-language model, "
        "reduced (apply_pumer) vs. unreduced, measured interleaved in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d.model, help=f"a model folder, or a preset: {', '.join(PRESETS)}")
    from ..methods import list_methods

    p.add_argument("--methods", type=_strs, default=",".join(d.methods),
                   help=f"comma-separated methods, or all ({', '.join(list_methods())})")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method's own option (e.g. merge_share=0.25, dominant=54), for every benchmarked method "
                   "that takes it; repeatable")
    p.add_argument("--layers", type=_ints, default=None,
                   help="comma-separated decoder layers every method reduces at (default: each method's own); "
                   "e.g. random at PuMer's layers is a control that selects for free with the same stages")
    p.add_argument("--fractions", type=_floats, default=",".join(f"{f:g}" for f in d.fractions),
                   help="comma-separated kept fractions (1 measures the hooks' overhead)")
    p.add_argument("--batch-sizes", type=_ints, default=",".join(map(str, d.batch_sizes)),
                   help="comma-separated generation batch sizes")
    from ..loading import DTYPE_NAMES

    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPE_NAMES), help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes nf4 (tower, projector, lm_head kept)")
    p.add_argument("--attn", default=d.attn, choices=["sdpa", "eager", "flash_attention_2"],
                   help="attention implementation the model is loaded with")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed prefill repeats per config")
    p.add_argument("--gen-repeats", type=int, default=d.gen_repeats, help="timed generate repeats (0: skip)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="discarded warm-up rounds")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens each generate makes")
    p.add_argument("--prefix-tokens", type=int, default=None, help="text tokens before the image")
    p.add_argument("--suffix-tokens", type=int, default=None, help="text tokens after the image")
    p.add_argument("--image-size", type=_size, default=None, metavar="WxH",
                   help="the image a model folder's processor encodes (default: the tower's square input); "
                   "it sets the visual-token count of anyres and Qwen-VL models")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-memory", action="store_true", help="skip the untimed peak-memory runs")
    p.add_argument("--cache", default=d.cache, choices=["dynamic", "static"],
                   help="generate()'s KV cache; static preallocates it (reduced layers to what they keep)")
    p.add_argument("--compile", action="store_true",
                   help="compile generate()'s decoding forward (torch.compile, fullgraph; needs --cache static); "
                        "warm-up runs compile every setting before the timed ones")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random weights, inputs and the random method")
    p.add_argument("--out", default=None,
                   help="output prefix (.json/.md/.png); default eval/results/speed_<device>_<model>_<dtype>")
    p.add_argument("--no-plot", action="store_true", help="write the JSON and Markdown only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = args.methods
    if methods == ("all",):
        from ..methods import list_methods

        methods = tuple(list_methods())
    try:
        options = parse_options(args.option)
    except ValueError as exc:
        print(f"pumer-bench: {exc}", file=sys.stderr)
        return 2
    spec = BenchSpec(
        model=args.model, methods=methods, options=options, fractions=args.fractions, batch_sizes=args.batch_sizes,
        dtype=args.dtype, load_in_4bit=args.load_in_4bit, attn=args.attn, device=args.device,
        repeats=args.repeats, gen_repeats=args.gen_repeats, warmup=args.warmup, new_tokens=args.new_tokens,
        prefix_tokens=args.prefix_tokens, suffix_tokens=args.suffix_tokens, threads=args.threads,
        memory=not args.no_memory, seed=args.seed, cache=args.cache, image_size=args.image_size,
        compile=args.compile, layers=args.layers,
    )
    try:
        spec.validate()
        if args.gen_repeats == 0:
            spec.batch_sizes = ()
        result = run_benchmark(spec, progress=not args.quiet)
    except ValueError as exc:
        print(f"pumer-bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npumer-bench: interrupted, nothing written", file=sys.stderr)
        return 130
    if result["interrupted"] and not result["prefill"]:
        print("\npumer-bench: interrupted before the prefill table was finished: nothing written", file=sys.stderr)
        return 130
    prefix = args.out or str(Path("eval/results") / default_prefix(result))
    paths = write_outputs(result, prefix, make_plot=not args.no_plot and not result["interrupted"])
    print(to_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    if result["interrupted"]:
        print("pumer-bench: interrupted: the files hold the rows that finished", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
