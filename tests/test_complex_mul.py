"""The complex-product rule of the pointwise normal form (`gg_notebook.ir.complex_mul`):
``view_as_real(view_as_complex(x) * w)`` is rewritten into its real even/odd form, numerically equal
on random and adversarial inputs, and left alone wherever an argument is outside what it decides."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from gg_notebook.ir.pointwise_normal import normalize

aten = torch.ops.aten
RULE = "complex-mul-as-real"
_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5)}
_CDT = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _trace(fn, *xs):
    return make_fx(torch.func.functionalize(fn), tracing_mode="fake")(*xs)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _x(shape, dtype, kind, g):
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "large":
        x = x * 1e4
    elif kind == "mixed":
        x = x * torch.where(torch.rand(shape, generator=g) < 0.3, 1e3, 1e-3)
        x.view(-1)[0] = 0.0
        x.view(-1)[-1] = -0.0
    return x.to(dtype)


def _table(shape, dtype, kind, g):
    if kind == "polar":
        ang = torch.randn(shape, generator=g, dtype=torch.float64) * 10
        w = torch.polar(torch.ones_like(ang), ang)
    else:
        w = torch.complex(torch.randn(shape, generator=g, dtype=torch.float64),
                          torch.randn(shape, generator=g, dtype=torch.float64))
        if kind == "large":
            w = w * 1e3
    return w.to(_CDT[dtype])


def _check(fn, x, w):
    gm = _trace(fn, x, w)
    normalize(gm)
    gm.recompile()
    assert gm.meta.get("gg_normalized", {}).get(RULE, 0) >= 1, (gm.meta.get("gg_normalized"), gm.graph)
    assert aten.view_as_complex.default not in _targets(gm), gm.graph
    assert aten.stack.default in _targets(gm), gm.graph
    got, want = gm(x, w), fn(x, w)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = _TOL[x.dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    assert torch.allclose(got, want, rtol=rtol, atol=atol * max(1.0, scale)), (got - want).abs().max()


def _rope_complex(x, w):  # Llama's apply_rotary_emb
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * w).flatten(-2)


def _table_first(x, w):
    return torch.view_as_real(w * torch.view_as_complex(x.unflatten(-1, (-1, 2)))).flatten(-2)


def _pairs_given(x, w):  # x already [..., D/2, 2]; product kept 3-d
    return torch.view_as_real(torch.view_as_complex(x) * w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fn", [_rope_complex, _table_first], ids=["x-first", "table-first"])
def test_rope_product_numerically(fn, dtype):
    g = torch.Generator().manual_seed(0)
    # (x shape, table shape): full, broadcast over batch / heads like freqs_cis[None, :, None, :]
    shapes = [((2, 8, 4, 8), (1, 8, 1, 4)), ((3, 6), (3, 3)), ((2, 5, 3, 2), (5, 1, 1)), ((4, 16), (8,))]
    for xs, ws in shapes:
        for xk in ("randn", "zeros", "large", "mixed"):
            for wk in ("polar", "randn", "large"):
                _check(fn, _x(xs, dtype, xk, g), _table(ws, dtype, wk, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairs_and_two_products(dtype):
    g = torch.Generator().manual_seed(1)
    x, w = _x((3, 4, 2), dtype, "randn", g), _table((3, 4), dtype, "randn", g)
    _check(_pairs_given, x, w)

    # the inverse rotation with a table conjugated physically (no lazy conj bit)
    _check(lambda x, w: torch.view_as_real(torch.view_as_complex(x) * torch.conj_physical(w)), x, w)

    def both(x, w):  # two rotations (q and k); a product of two complex views (x * conj-free x)
        z = torch.view_as_complex(x)
        return torch.view_as_real(z * w) + torch.view_as_real(z * z)

    gm = _trace(both, x, w)
    assert normalize(gm) == 2
    gm.recompile()
    rtol, atol = _TOL[dtype]
    assert torch.allclose(gm(x, w), both(x, w), rtol=rtol, atol=atol * 10)


def _declines(fn, *xs):
    gm = _trace(fn, *xs)
    before = [str(t) for t in _targets(gm)]
    normalize(gm)
    assert not gm.meta.get("gg_normalized", {}).get(RULE), gm.graph
    assert [str(t) for t in _targets(gm)] == before


def test_declines():
    x64 = torch.randn(2, 4, 2, dtype=torch.float64)
    x32 = x64.float()
    w128 = torch.randn(2, 4, dtype=torch.complex128)
    # mixed precision: complex64 view times a complex128 table (promotion, not the formula's dtype)
    _declines(lambda x, w: torch.view_as_real(torch.view_as_complex(x) * w), x32, w128)
    # a real factor (a scaling, not a rotation) and a complex scalar
    _declines(lambda x, r: torch.view_as_real(torch.view_as_complex(x) * r), x64, torch.randn(2, 4, dtype=torch.float64))
    _declines(lambda x: torch.view_as_real(torch.view_as_complex(x) * (0.5 + 2j)), x64)
    # the complex product is read by something else too: it stays whole
    def shared(x, w):
        p = torch.view_as_complex(x) * w
        return torch.view_as_real(p), p.abs()

    _declines(shared, x64, w128)
    # not a product: division, and a product not read back as real
    _declines(lambda x, w: torch.view_as_real(torch.view_as_complex(x) / w), x64, w128)
    _declines(lambda x, w: (torch.view_as_complex(x) * w).abs(), x64, w128)
    # a lazily conjugated table (conj bit kept through views and clone): view_as_real would refuse it
    _declines(lambda x, w: torch.view_as_real(torch.view_as_complex(x) * w.conj()[None, :]), x64, w128[0])
    _declines(lambda x, w: torch.view_as_real(torch.view_as_complex(x) * w.conj()), x64, w128)
    # both operands complex, neither a view of real pairs
    _declines(lambda a, w: torch.view_as_real(a * w), w128, w128)


def test_complex_mul_in_verify():
    """End to end: the complex spelling against the real even/odd one, and a wrong-sign rotation."""
    import gg_notebook as gg

    D, S = 8, 6

    def angles(start, n):
        return torch.outer(torch.arange(start, start + n, dtype=torch.float64),
                           1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)))

    def spec(q):
        ang = angles(0, q.shape[0])
        fc = torch.polar(torch.ones_like(ang), ang)
        return torch.view_as_real(torch.view_as_complex(q.view(*q.shape[:-1], -1, 2)) * fc[:, None, :]).flatten(-2)

    def rank(q, sign=1.0):
        ang = angles(0, q.shape[0])
        c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x0, x1 = q[..., 0::2], q[..., 1::2]
        return torch.stack((x0 * c - sign * x1 * s, x0 * s + x1 * c), -1).flatten(-2)

    q = torch.randn(S, 4, D, dtype=torch.float64)
    ok = gg.verify(gg.Problem(sequential=spec, distributed=rank, inputs=[q], placements=[gg.Shard(1)],
                              world_size=2, expect=[gg.Shard(1)]))
    assert ok.status is gg.Status.PROVED, ok
    bad = gg.verify(gg.Problem(sequential=spec, distributed=lambda q: rank(q, -1.0), inputs=[q],
                               placements=[gg.Shard(1)], world_size=2, expect=[gg.Shard(1)]))
    assert bad.status is gg.Status.REFUTED, bad
