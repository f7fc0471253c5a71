"""``tensor.data = other`` inside a traced program.

Assigning ``.data`` swaps the storage behind a tensor object without a dispatcher call, so make_fx
would keep reading the tensor's old graph node: the captured program would not be the program that
runs (hand-written ZeRO-3 / FSDP code frees and re-gathers parameters exactly this way,
``p.data = full`` ... ``p.data = shard``). While a program is traced, `follow_data_assignments()` lets
the assignment happen and then points the tensor at the graph node of its new value, which is what
eager execution does (the tensor now aliases ``other``'s storage; its autograd identity stays its own,
and the graph records the operators autograd then runs).

A value the tracer does not know (no graph node) cannot be followed: the assignment is refused with
the line that does it, rather than captured wrongly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.overrides import TorchFunctionMode

_DATA_DESCRIPTOR = torch._C.TensorBase.data


class UntraceableAssignment(Exception):
    """A ``.data`` assignment whose new value has no node in the graph being traced."""


def _is_data_assignment(func) -> bool:
    return getattr(func, "__name__", None) == "__set__" and getattr(func, "__self__", None) is _DATA_DESCRIPTOR


_UNTRACEABLE = ("`tensor.data = other` with a value the trace has no operator for (a tensor made outside the "
                "traced program); create it inside the program, pass it as an input, or copy the values in "
                "(`with torch.no_grad(): t.copy_(other)`)")


class _FollowDataAssignments(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _is_data_assignment(func):
            target, value = args
            _unrecordable_from_here()
            from gg_notebook.capture.direct_trace import active_tracer

            mode = get_proxy_mode()
            direct = active_tracer() if mode is None else None
            if direct is not None and not direct.follow_data_assignment(target, value):
                raise UntraceableAssignment(_UNTRACEABLE)
            if mode is not None:
                tracker = mode.tracer.tensor_tracker
                if value not in tracker:
                    raise UntraceableAssignment(_UNTRACEABLE)
                tracker[target] = tracker[value]
        return out


def _unrecordable_from_here() -> None:
    """A recording of the operator calls running now (`symmetry.OpRecorder`, a representative's inside
    its trace) cannot see the swap: it is marked as failed, so no rank is derived from it or compared
    with it (it keys tensors by object; another rank may run the same calls without the swap)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from gg_notebook.capture.symmetry import OpRecorder

    for m in _get_current_dispatch_mode_stack():
        if isinstance(m, OpRecorder) and m.broken is None:
            m.broken = "`tensor.data = other` (the swap reaches no operator: not recordable)"


@contextmanager
def follow_data_assignments() -> Iterator[None]:
    """While active (inside make_fx), ``t.data = other`` makes later uses of ``t`` read ``other``'s node."""
    with _FollowDataAssignments():
        yield


class _RefuseDataAssignments(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _is_data_assignment(func):
            raise UntraceableAssignment("`tensor.data = other` (not recordable: the rank is traced on its own)")
        return func(*args, **(kwargs or {}))


@contextmanager
def refuse_data_assignments() -> Iterator[None]:
    """While active, ``t.data = other`` raises `UntraceableAssignment` (for a recording of the calls a
    rank makes, which keys tensors by object and would not see the swap)."""
    with _RefuseDataAssignments():
        yield
