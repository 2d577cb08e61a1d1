"""Loading a supported model for the tools: one place for device, dtype, quantization, classes.

``pumer-chat``, ``pumer-bench``, the lmms-eval plugin and the accuracy benchmark load
checkpoints through :func:`load_model`; which class a checkpoint needs, which modules stay
in full precision under bitsandbytes, and what counts as a visual token come from the
adapter table (:mod:`pumer_llava.hooks.adapters`), never from a check of the model's name.
Every problem is a ``ValueError`` that says what was wrong and what is accepted, raised
before any weight is read.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch

from .hooks.adapters import ADAPTERS, Adapter

# one dtype vocabulary for every tool: both spellings are accepted
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
QUANT = (None, "4bit", "8bit")


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``..."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}; accepted: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: CUDA is not available here (torch {torch.__version__}); use cpu")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``auto``: float16 on CUDA, float32 elsewhere; else a name of :data:`DTYPE_NAMES`."""
    if name in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    key = str(name).strip().lower().replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[key]


def adapter_for(config: Any) -> Adapter:
    """The adapter row of a checkpoint's config (by ``model_type``), or a ValueError listing them."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(f"{a.class_name} (model_type={k!r})" for k, a in ADAPTERS.items())
        raise ValueError(f"model_type {model_type!r} is not a supported vision-language model; supported: {supported}")
    return ADAPTERS[model_type]


def read_config(path: str, revision: str = "main", trust_remote_code: bool = False):
    """The config of a folder or hub id, with the folder checked first (clear messages)."""
    from transformers import AutoConfig

    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{path}: not a folder (expected a Hugging Face model folder or hub id)")
        if not (local / "config.json").is_file():
            raise ValueError(f"{path} is not a model folder: it has no config.json")
        path = str(local)
    elif str(path).startswith(("/", ".", "~")) or str(path).count("/") > 1:
        raise ValueError(f"no such model folder: {local} (and not a hub id like 'llava-hf/llava-1.5-7b-hf')")
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code), path
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ValueError(f"cannot read a model config from {path}: {first}") from None


def quantization_config(adapter: Adapter, quant: str | None, compute_dtype: torch.dtype):
    """bitsandbytes settings for the language model; the adapter's full-precision modules skipped."""
    if quant not in QUANT:
        raise ValueError(f"quantization {quant!r} is not one of 4bit, 8bit (or none)")
    if quant is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"{quant} weights need bitsandbytes: pip install 'pumer_llava[quant]'") from None
    from transformers import BitsAndBytesConfig

    skip = list(adapter.full_precision)
    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_model(
    path: str,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    quant: str | None = None,
    attn: str | None = None,
    revision: str = "main",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    processor: bool = True,
):
    """``(model, processor or None, adapter)`` for a supported checkpoint, in eval mode.

    The class is the adapter row's (``AutoConfig``'s ``model_type`` picks the row); under
    ``quant`` the row's vision tower, projector and ``lm_head`` stay in ``dtype``.
    """
    config, path = read_config(path, revision, trust_remote_code)
    adapter = adapter_for(config)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    import transformers

    cls = getattr(transformers, adapter.class_name, None)
    if cls is None:
        raise ValueError(f"this transformers ({transformers.__version__}) has no {adapter.class_name}")
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    q = quantization_config(adapter, quant, torch_dtype)
    if q is not None:
        kwargs.update(quantization_config=q, device_map=device_map or {"": str(dev)})
    elif device_map:
        kwargs["device_map"] = device_map
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ValueError(f"cannot load {path}: {first}") from None
    if "device_map" not in kwargs:
        model.to(dev)
    model.eval()
    proc = load_processor(path, adapter, revision, trust_remote_code) if processor else None
    return model, proc, adapter


@functools.cache
def image_only(cls: type) -> type:
    """``cls`` (a transformers processor class) without its video processor.

    Every transformers video processor needs torchvision; the image processors fall back to
    their PIL backend without it. The class returned loads and calls like ``cls`` on images
    and text, and has no ``video_processor`` (a video input is then an error).
    """

    class ImageOnly(cls):
        @classmethod
        def get_attributes(klass):
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    ImageOnly.__module__ = cls.__module__
    return ImageOnly


def load_processor(path: str, adapter: Adapter, revision: str = "main", trust_remote_code: bool = False):
    """The checkpoint's processor (``AutoProcessor``), checked to have a tokenizer and an image processor.

    Without torchvision, a row whose processor carries a video processor (LLaVA-OneVision,
    Qwen2-VL, Qwen2.5-VL) loads it as :func:`image_only` with a warning: images work, videos
    need ``pip install torchvision``.
    """
    import transformers
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    cls = getattr(transformers, adapter.processor_class, None)
    loader: Any = AutoProcessor
    if cls is not None and not is_torchvision_available() and "video_processor" in cls.get_attributes():
        loader = image_only(cls)
        warnings.warn(f"torchvision is not installed: {cls.__name__} is loaded without its video processor "
                      "(images work; videos need torchvision)", stacklevel=2)
    try:
        proc = loader.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ValueError(f"cannot load the processor of {path}: {first}") from None
    if getattr(proc, "tokenizer", None) is None or getattr(proc, "image_processor", None) is None:
        raise ValueError(f"{path}: its processor has no tokenizer or no image processor (got {type(proc).__name__})")
    return proc


def count_visual_tokens(adapter: Adapter, config: Any, input_ids: torch.Tensor) -> list[int]:
    """Per row, the visual tokens (image and video placeholders) of ``input_ids``."""
    ids = torch.tensor(adapter.visual_token_ids(config), device=input_ids.device)
    return torch.isin(input_ids, ids).sum(-1).tolist()
