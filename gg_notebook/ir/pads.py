"""Padding operators as concatenations with constant blocks.

Autograd spells the gradient of a slice ``x[..., a:b]`` as ``slice_backward(g, sizes, dim, a, b, 1)``
(zeros with ``g`` written at ``a:b``), of a ``select`` as ``select_backward``, and ``F.pad`` is
``constant_pad_nd``. Each is exactly ``cat([full(before), g, full(after)], dim)`` (bit for bit: the
kernels copy ``g`` and fill the rest), so the lowering writes them that way and the concatenation
lemmas move them through shards like any other ``cat`` (RoPE's ``rotate_half`` backward on heads
sharded across ranks). Anything else (a step other than 1, negative padding, a non-constant mode)
stays a generic call.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

PADS = {"slice_backward", "select_backward", "constant_pad_nd"}


def _arg(fx, i: int, name: str, default=None):
    if len(fx.args) > i:
        return fx.args[i]
    return fx.kwargs.get(name, default)


def lower_pad(low, fx, packet: str, shape, dtype):
    """The lowering of ``fx`` (a `PADS` operator) as constant blocks and ``cat``s, or None."""
    if shape is None or dtype is None or not all(isinstance(s, int) for s in shape):
        return None
    src_fx = fx.args[0]
    if not isinstance(src_fx, torch.fx.Node):
        return None
    src = low.env.get(src_fx)
    if src is None or not hasattr(src, "shape") or src.dtype != dtype:
        return None
    n = len(shape)
    if packet == "slice_backward":
        dim, start, end, step = (_arg(fx, 2, "dim"), _arg(fx, 3, "start"), _arg(fx, 4, "end"), _arg(fx, 5, "step"))
        if not all(isinstance(v, int) for v in (dim, start, end, step)) or step != 1 or n == 0:
            return None
        dim %= n
        start, end, _ = slice(start, end, 1).indices(shape[dim])
        if end - start != src.shape[dim]:
            return None
        return _padded(low, fx, src, {dim: (start, shape[dim] - end)}, 0, shape, dtype)
    if packet == "select_backward":
        dim, index = _arg(fx, 2, "dim"), _arg(fx, 3, "index")
        if not all(isinstance(v, int) for v in (dim, index)) or n == 0:
            return None
        dim %= n
        index %= shape[dim]
        vshape = list(shape)
        vshape[dim] = 1
        if tuple(src.shape) != tuple(vshape[:dim] + vshape[dim + 1:]):
            return None
        v = low.view(src, tuple(vshape), dtype)
        return _padded(low, fx, v, {dim: (index, shape[dim] - index - 1)}, 0, shape, dtype)
    if packet == "constant_pad_nd":
        pad = _arg(fx, 1, "pad")
        value = _arg(fx, 2, "value", 0)
        if not isinstance(pad, (list, tuple)) or len(pad) % 2 or len(pad) // 2 > n or \
                not all(isinstance(p, int) and p >= 0 for p in pad) or not isinstance(value, (int, float, bool)):
            return None
        widths = {}
        for k in range(len(pad) // 2):
            d = n - 1 - k
            if pad[2 * k] or pad[2 * k + 1]:
                widths[d] = (pad[2 * k], pad[2 * k + 1])
        return _padded(low, fx, src, widths, value, shape, dtype)
    return None


def _padded(low, fx, src, widths: dict, value, shape, dtype):
    """``src`` with ``widths[d] = (before, after)`` blocks of ``value`` along each dim d."""
    from gg_notebook.ir.lower import _Full
    from gg_notebook.relations.expr import OpSpec

    cur = src
    cur_shape = list(src.shape)
    for d in sorted(widths):
        before, after = widths[d]
        pieces = []
        for k, width in (("before", before), ("after", after)):
            if width:
                bshape = list(cur_shape)
                bshape[d] = width
                spec = OpSpec("const", f"full({value})", _Full.of(tuple(bshape), value, dtype), ((), ()))
                pieces.append((k, low.emit("const", spec, (), tuple(bshape), dtype, name=f"{fx.name}_{k}{d}")))
        blocks = dict(pieces)
        parts = [p for p in (blocks.get("before"), cur, blocks.get("after")) if p is not None]
        cur_shape[d] += before + after
        if len(parts) > 1:
            cur = low.emit("cat", d, parts, tuple(cur_shape), dtype, name=f"{fx.name}_pad{d}")
    if tuple(cur_shape) != tuple(shape):
        return None
    return cur
