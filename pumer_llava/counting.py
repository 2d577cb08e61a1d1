"""Count what a forward costs a GPU beyond its FLOPs: kernel launches and host syncs.

On a GPU a small model's prefill or decode step is bound by how many kernels it
launches and by every point where the CPU must wait for the GPU to finish (a *host
sync*: ``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``, ``nonzero``, boolean
indexing, ``torch.equal``, ``unique``...). Neither shows on a CPU timing, so
:class:`OpCounter` counts them on any device:

- ``ops``: ATen operators dispatched, views and metadata ops included;
- ``kernels``: the operators that launch work on the device: ``ops`` less views (an op
  whose result aliases its input: ``view``, ``expand``, ``transpose``, slicing...) and
  ops that return no tensor;
- ``syncs``: operators whose result the host must read (by name, below), every
  ``Tensor.tolist()`` call (which reads memory without dispatching an operator), and copies
  between the host and a device that wait for the device (to the host; to a device unless
  non-blocking from pinned memory);
- ``host_tensors``: tensors made from Python data (``torch.tensor(...)``): a model on a GPU
  uploads each one (seen on any device, so a CPU test can pin how many a forward makes).

Used by ``pumer-bench`` (the op and sync columns) and by tests that pin the plug-in's
overhead::

    with OpCounter() as c:
        model(**inputs)
    c.ops, c.kernels, c.syncs, c.sync_ops  # sync_ops: which operators synced, with counts

and :func:`flop_counter`, the FLOPs a forward actually runs (what a speed-up from reduction
is predicted from), and :func:`kv_cache_bytes`, what a KV cache holds.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

# operators whose output size or value the host needs before it can go on
_SYNC_PACKETS = (
    _aten._local_scalar_dense,  # .item(), int(t), float(t), bool(t)
    _aten.nonzero,
    _aten.equal,
    _aten.is_nonzero,
    _aten.masked_select,
    _aten.unique_consecutive,
    _aten._unique2,
    _aten._unique,
    _aten.unique_dim,
)
_SYNC = {p for p in _SYNC_PACKETS}


def _copy_sync(func, args, kwargs) -> bool:
    """A copy between the host and a device that makes the host wait: to the host always; to a
    device unless it is non-blocking from pinned memory (a blocking copy waits for the stream,
    and one from pageable memory may, the driver staging it)."""
    kwargs = kwargs or {}
    if func.overloadpacket is _aten._to_copy:
        src = args[0]
        dst_dev, blocking = kwargs.get("device") or src.device, not kwargs.get("non_blocking", False)
    else:  # copy_(dst, src, non_blocking)
        dst, src = args[0], args[1]
        if not isinstance(src, torch.Tensor):
            return False
        dst_dev = dst.device
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    src_type, dst_type = src.device.type, torch.device(dst_dev).type
    if dst_type == src_type:
        return False
    if dst_type == "cpu":
        return True
    return src_type == "cpu" and (blocking or not src.is_pinned())


def _is_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in _SYNC:
        return True
    if packet in (_aten._to_copy, _aten.copy_):
        return _copy_sync(func, args, kwargs)
    if packet is _aten.repeat_interleave and func is _aten.repeat_interleave.Tensor:
        return (kwargs or {}).get("output_size") is None and (len(args) < 3 or args[2] is None)
    if packet in (_aten.index, _aten.index_put, _aten.index_put_):
        idx = args[1] if len(args) > 1 else ()
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in idx or ())
    return False


_KINDS: dict = {}
# views whose schema does not say so (reshape's output when it needs no copy)
_VIEWS_WITHOUT_ALIAS = {_aten._unsafe_view, _aten._reshape_alias}


def launches_work(func) -> bool:
    """Whether an operator does device work: it returns a tensor that is not a view of an input."""
    hit = _KINDS.get(func)
    if hit is None:
        rets = func._schema.returns
        tensors = [r for r in rets if "Tensor" in str(r.type)]
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in rets)
        view = view or func.overloadpacket in _VIEWS_WITHOUT_ALIAS
        hit = _KINDS[func] = bool(tensors) and not view
    return hit


class OpCounter(TorchDispatchMode):
    """Counts dispatched ATen operators and host syncs inside its ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.kernels = 0
        self.syncs = 0
        self.host_tensors = 0
        self.sync_ops: Counter[str] = Counter()
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.host_tensors += func.overloadpacket is _aten.lift_fresh
        sync = _is_sync(func, args, kwargs)
        self.kernels += sync or launches_work(func)
        if sync:
            self.syncs += 1
            self.sync_ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter, original = self, torch.Tensor.tolist

        def tolist(t, *a, **kw):
            counter.syncs += 1
            counter.sync_ops["tolist"] += 1
            return original(t, *a, **kw)

        self._tolist = original
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def to_dict(self) -> dict:
        return {"ops": self.ops, "kernels": self.kernels, "syncs": self.syncs, "sync_ops": dict(self.sync_ops),
                "host_tensors": self.host_tensors}


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` (no printout) that also counts the CPU
    attention kernel, as torch counts the CUDA ones: every matrix product, convolution and
    attention a forward runs, 2 FLOPs per multiply-add, whatever the architecture (gated
    MLPs, grouped-query attention, the vision tower and projector, the scoring a reduction
    adds). Only ATen operators are seen: kernels of other packages (flash-attn's own attention,
    custom quantized matmuls) are not counted. ``get_total_flops()`` may be read inside the
    block, e.g. from module hooks::

        with flop_counter() as f:
            model(**inputs)
        f.get_total_flops()
    """
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={_aten._scaled_dot_product_flash_attention_for_cpu:
                                                          _cpu_attention_flops})


def kv_cache_bytes(cache) -> tuple[int, list[int]]:
    """(bytes of all key/value tensors, tokens held per layer) of a transformers cache."""
    total, tokens = 0, []
    for layer in getattr(cache, "layers", None) or []:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        for t in (keys, values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        tokens.append(int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.ndim >= 2 else 0)
    return total, tokens
