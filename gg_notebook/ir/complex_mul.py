"""A complex elementwise product in real arithmetic (the pointwise normal form, real mode only).

Llama's ``apply_rotary_emb`` rotates consecutive pairs ``(x0, x1)`` of the head dim as complex
numbers, ``view_as_real(view_as_complex(x) * freqs_cis)``; the same rotation is as often written on
the even / odd lanes in real arithmetic, ``(x0 * cos - x1 * sin, x0 * sin + x1 * cos)``. Over the
reals these are one function:

    view_as_real(view_as_complex(x) * w)
        = stack((x[..., 0] * re(w) - x[..., 1] * im(w),  x[..., 0] * im(w) + x[..., 1] * re(w)), -1)

with ``re(w) = view_as_real(w)[..., 0]`` and ``im(w) = view_as_real(w)[..., 1]``. The rewrite turns
the first spelling into the second, so both programs reach the lemmas as one term (the pair
selects are data movement, decided on index tensors; a table ``re(w)`` built with ``polar`` is
compared by value with a ``cos`` table by the ground relations).

Decided on every argument: ``view_as_real`` of a ``mul.Tensor`` (two tensor operands, no other
argument) of complex64/complex128, one operand ``view_as_complex(x)`` of a float32/float64 ``x``
whose last dim is 2, the other a complex tensor of the same dtype as the product (either operand
order; when both are ``view_as_complex`` the first is taken as ``x``). A real factor, a complex
scalar, half-precision complex, a product read by anything else than ``view_as_real``, or ``w``
of another complex dtype are left alone, and so is a ``w`` that may carry the lazy conjugate bit (any
lazy ``conj()`` among its ancestors: ``view_as_real`` refuses such a tensor). IEEE complex multiplication is not this formula bit for
bit (it may fuse or rescale), which is why the rule is real-mode only, like the whole normal form.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_TO_COMPLEX = {aten.view_as_complex.default}
_TO_REAL = {aten.view_as_real.default}
for _name in ("view_as_complex_copy", "view_as_real_copy"):
    _p = getattr(aten, _name, None)
    if _p is not None:
        (_TO_COMPLEX if "complex" in _name else _TO_REAL).add(_p.default)


_CONJ = {aten._conj.default, aten.conj.default}


def _may_be_conj(w) -> bool:
    """May ``w`` carry PyTorch's lazy conjugate bit? (``view_as_real`` refuses such a tensor, so the
    rewritten graph would not run.) The bit survives views and copies (``clone`` keeps it) and the
    fake values of a functionalized graph do not always show it, so: True if a lazy ``conj`` is
    anywhere among ``w``'s ancestors (or there are too many to look at)."""
    seen, stack = set(), [w]
    while stack:
        m = stack.pop()
        if not isinstance(m, fx.Node) or m in seen:
            continue
        seen.add(m)
        if len(seen) > 4096:
            return True
        if m.op == "call_function" and m.target in _CONJ:
            return True
        stack.extend(m.all_input_nodes)
    return False


def _operands(n: fx.Node):
    """(x, w) of ``n = view_as_complex(x) * w`` as the module docstring decides, else None."""
    from gg_notebook.ir.pointwise_normal import _call, _dtype, _plain_mul, _shape

    if not _plain_mul(n) or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    dt = _dtype(n)
    if dt not in _COMPLEX:
        return None
    for z, w in (n.args, n.args[::-1]):
        if not _call(z, *_TO_COMPLEX) or len(z.args) != 1 or z.kwargs or not isinstance(z.args[0], fx.Node):
            continue
        x = z.args[0]
        xs = _shape(x)
        if _dtype(x) != _COMPLEX[dt] or _dtype(z) != dt or not xs or xs[-1] != 2:
            continue
        if _dtype(w) != dt or _shape(w) is None or _may_be_conj(w):
            continue
        return x, w
    return None


def rewrite_complex_mul(rw, n: fx.Node) -> bool:
    """Rewrite ``n = view_as_real(view_as_complex(x) * w)`` (``rw``: the normal form's rewriter)."""
    from gg_notebook.ir.pointwise_normal import _call, _dtype, _shape

    if not _call(n, *_TO_REAL) or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
        return False
    m = n.args[0]
    got = _operands(m)
    if got is None or len(m.users) != 1:
        return False
    x, w = got
    rdt = _COMPLEX[_dtype(m)]
    if _dtype(n) != rdt or _shape(n) != tuple(_shape(m)) + (2,):
        return False
    wr2 = rw.emit(n, m, aten.view_as_real.default, (w,))
    wr = rw.emit(n, m, aten.select.int, (wr2, -1, 0))
    wi = rw.emit(n, m, aten.select.int, (wr2, -1, 1))
    xr = rw.emit(n, m, aten.select.int, (x, -1, 0))
    xi = rw.emit(n, m, aten.select.int, (x, -1, 1))
    mul = lambda a, b: rw.emit(n, m, aten.mul.Tensor, (a, b))  # noqa: E731
    re = rw.emit(n, m, aten.sub.Tensor, (mul(xr, wr), mul(xi, wi)))
    im = rw.emit(n, m, aten.add.Tensor, (mul(xr, wi), mul(xi, wr)))
    out = rw.emit(n, n, aten.stack.default, ([re, im], -1))
    return rw.replace(n, out, "complex-mul-as-real")


__all__ = ["rewrite_complex_mul"]
