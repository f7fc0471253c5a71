"""A cheaper key in front of FakeTensorMode's own dispatch cache, for the modes that run whole programs.

Recording a rank (`capture.symmetry.record_rank`) and the direct first pass (`capture.direct_trace`)
run the user's program on fake tensors, one operator call at a time. Most of a call's cost is in
FakeTensorMode: for every call it builds its cache key (each tensor argument's metadata extracted into
a dataclass and flattened into a list: ~25 us per tensor here) before it finds the entry it made the
first time the same call was seen, and makes the result from it. A 126-layer model makes the same
few hundred calls in every layer.

`FakeDispatchMemo` keeps, per *cheap key*, the entry FakeTensorMode made (or found) for that call,
and on a later call with the same cheap key makes the result from that entry itself, exactly as
FakeTensorMode does on a cache hit (`_output_from_cache_entry`). The cheap key holds everything
FakeTensorMode's key holds, read directly (the operator; the default dtype and device; inference
mode; every argument by type and value, nested lists/tuples by type and length; every tensor by
dtype, sizes, strides, storage offset, device, layout, storage bytes, requires_grad, conj/neg bits and
inference flag), so two calls with the same cheap key have the same FakeTensorMode key: the memo only
skips work, never changes a result. It steps aside (the call goes to FakeTensorMode as before)
wherever FakeTensorMode itself would not use its cache or where another mode must see the call:

- anything but plain FakeTensors of this mode without a constant (real tensors, tensor subclasses,
  symbolic sizes, sparse layouts, arguments of another type: callables, script objects, ...);
- a fake mode with a shape environment, or with its cache off;
- any other dispatch mode below the caller (make_fx's proxy mode, functionalization, a user's mode):
  they would not see the call;
- calls FakeTensorMode decided not to cache (its entry is a bypass, or it made none).

Two shortcuts that give what FakeTensorMode gives, more cheaply:

- ``aten._unsafe_view`` is asked as ``aten.view``. FakeTensorMode computes both with the same function
  (``fake_impls._view_meta``: same sizes, strides and offset, the input's storage), but never caches
  ``_unsafe_view`` (its schema does not say that the result aliases its input), so every call paid
  the full dispatch (~8% of a transformer's calls: ``matmul`` of a 3-d input ends in one). Autograd,
  above this mode, still sees the call it made (`_unsafe_view`'s backward), and a recorder above it
  writes down ``_unsafe_view``.
- A remembered result that is one fresh tensor (not in place, not a view: most calls) is made as
  FakeTensorMode makes it from its entry (``_get_output_tensor_from_cache_entry``: an empty meta
  tensor of the entry's sizes, strides, dtype and requires_grad, wrapped for the entry's device),
  without reading the entry again on every call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

_FAKE = torch._C._TorchDispatchModeKey.FAKE
_PROXY = torch._C._TorchDispatchModeKey.PROXY
_FUNCTIONAL = getattr(torch._C._TorchDispatchModeKey, "FUNCTIONAL", None)
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_MISSING = object()
enabled = True  # False: every call goes to FakeTensorMode (for same-machine measurements, benchmarks/)

try:  # FakeTensorMode's cache internals (torch >= 2.5); without them the memo is off
    from torch._subclasses.fake_tensor import _CacheKeyState, _DispatchCacheValidEntry, _BypassDispatchCache
    from torch._subclasses.fake_tensor import in_kernel_invocation_manager
    _AVAILABLE = hasattr(FakeTensorMode, "_output_from_cache_entry") and hasattr(FakeTensorMode, "_cache_key")
except ImportError:  # pragma: no cover - older torch
    _AVAILABLE = False
_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default
_VIEW = torch.ops.aten.view.default


def _fresh_output(entry) -> tuple | None:
    """(sizes, strides, dtype, requires_grad, device) of a cache entry whose result is one fresh
    strided tensor (`FakeDispatchMemo`'s second shortcut), or None (the entry is read as FakeTensorMode
    reads it: in place, a view, a tuple, a constant, a conjugate or negative bit, symbolic sizes, or
    a torch whose entries look otherwise)."""
    try:
        if entry.is_output_tuple or len(entry.output_infos) != 1:
            return None
        info = entry.output_infos[0]
        md = info.metadata
        if info.inplace_idx is not None or info.view_idx is not None or md is None:
            return None
        if md.layout is not torch.strided or md.is_conj or md.is_neg:
            return None
        shape, stride = tuple(md.shape), tuple(md.stride)
        if not all(type(v) is int for v in shape + stride):
            return None
        return shape, stride, md.dtype, bool(md.requires_grad), md.device
    except AttributeError:  # pragma: no cover - another torch's entries
        return None


def fresh_fake(mode: FakeTensorMode, shape: tuple, stride: tuple, dtype: torch.dtype, device,
               requires_grad: bool = False) -> FakeTensor | None:
    """A fresh fake tensor of ``mode`` (storage offset 0) with this metadata, made as FakeTensorMode
    makes a result from its cache entry: an empty meta tensor wrapped for ``device``, without a
    dispatch through the mode (used by the memo here and by `ir.pointwise_normal`). None where this
    torch does not make FakeTensors that way (the caller dispatches then)."""
    if not _AVAILABLE:
        return None
    try:
        with in_kernel_invocation_manager(mode):
            empty = torch.empty_strided(shape, stride, dtype=dtype, device="meta", requires_grad=requires_grad)
        return FakeTensor(mode, empty, device)
    except TypeError:  # pragma: no cover - another torch's FakeTensor constructor
        return None


class _NoKey(Exception):
    pass


class FakeDispatchMemo:
    """``memo(func, args, kwargs)`` is ``func(*args, **kwargs)`` for a dispatch mode sitting right
    above ``mode`` (see the module docstring)."""

    def __init__(self, mode: FakeTensorMode) -> None:
        self.mode = mode
        self.entries: dict = {}
        self.hits = 0
        self.on = bool(enabled and _AVAILABLE and getattr(mode, "cache_enabled", False) and mode.shape_env is None)

    def __call__(self, func, args: tuple, kwargs: dict) -> Any:
        if not self.on or not self._alone():
            return func(*args, **kwargs)
        if func is _UNSAFE_VIEW:
            func = _VIEW  # the same result in FakeTensorMode, and cached (module docstring)
        try:
            key = self._key(func, args, kwargs)
        except _NoKey:
            return func(*args, **kwargs)
        found = self.entries.get(key, _MISSING)
        if found is None:
            return func(*args, **kwargs)
        if found is not _MISSING:
            self.hits += 1
            torch_key, entry, fresh = found
            if fresh is not None:
                shape, stride, dtype, requires_grad, device = fresh
                made = fresh_fake(self.mode, shape, stride, dtype, device, requires_grad)
                if made is not None:
                    return made
            return self.mode._output_from_cache_entry(_CacheKeyState(None), entry, torch_key, func, args)
        try:
            torch_key = self.mode._cache_key(_CacheKeyState(None), func, args, kwargs)
        except _BypassDispatchCache:
            torch_key = None
        out = func(*args, **kwargs)
        entry = FakeTensorMode.cache.get(torch_key) if torch_key is not None else None
        self.entries[key] = (torch_key, entry, _fresh_output(entry)) \
            if isinstance(entry, _DispatchCacheValidEntry) else None
        return out

    def _alone(self) -> bool:
        """Only FakeTensorMode (this one) is below the caller."""
        return (torch._C._len_torch_dispatch_stack() == 1
                and torch._C._get_dispatch_mode(_FAKE) is self.mode
                and torch._C._get_dispatch_mode(_PROXY) is None
                and (_FUNCTIONAL is None or torch._C._get_dispatch_mode(_FUNCTIONAL) is None))

    def _key(self, func, args: tuple, kwargs: dict) -> tuple:
        key: list = [func, torch.get_default_dtype(), torch._C._get_default_device(),
                     torch.is_inference_mode_enabled()]
        self._walk(args, key)
        if kwargs:
            key.append(tuple(kwargs))
            self._walk(kwargs.values(), key)
        return tuple(key)

    def _walk(self, xs, key: list) -> None:
        mode = self.mode
        for x in xs:
            t = type(x)
            if t is FakeTensor:
                if x.fake_mode is not mode or x.constant is not None or x.layout is not torch.strided:
                    raise _NoKey
                key.append((x.dtype, x.shape, x.stride(), x.storage_offset(), x.fake_device,
                            x.untyped_storage().nbytes(), x.requires_grad, x.is_conj(), x.is_neg(),
                            x.is_inference()))
            elif t is list or t is tuple:
                key.append((t, len(x)))
                self._walk(x, key)
            elif t in _PLAIN:
                if t is float and x != x:
                    raise _NoKey  # NaN: never equal to itself, a key that would never hit
                key.append(t)
                key.append(x)
            else:
                raise _NoKey
