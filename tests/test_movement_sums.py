"""Randomized checks of the normal forms behind issue #8 items 1, 3, 4 (movement and sums).

* `gg_notebook.ir.decompose`: ``torch.roll`` as data movement, ``addcmul``/``addcdiv`` unfused;
* `gg_notebook.relations.sign_blocks`: a product with a constant of signs as slices and negations
  (bit for bit, with 0, -0.0, inf and nan in the data), and its declines;
* `gg_notebook.relations.sum_merge`: sums over adjacent slices merge in the scalar normal form,
  and only those;
* `gg_notebook.relations.zero_sum`: zero buffers written in disjoint slots and all-reduced are a
  gather, end to end through `gg.verify`; overlapping, missing, misplaced writes are never proved.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.distributed as dist

import gg_notebook as gg
from gg_notebook.ir.decompose import UNFUSE, _roll
from gg_notebook.relations.expr import ExprStore, OpSpec, evaluate
from gg_notebook.relations.ground import _as_value, describe
from gg_notebook.relations.linear import LinearForms
from gg_notebook.relations.sign_blocks import sign_blocks
from gg_notebook.ir.specs import ew_spec, reduce_spec

aten = torch.ops.aten
SEEDS = (0, 1, 2)


def _value(S: ExprStore, t: torch.Tensor):
    v = _as_value(t)
    return S.const(OpSpec("const", describe(v.tensor, v.uniform), v, ((), ())), tuple(t.shape), t.dtype)


# ------------------------------------------------------------------------------------------ roll
@pytest.mark.parametrize("seed", SEEDS)
def test_roll_definition_is_torch_roll(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        nd = int(torch.randint(1, 4, (1,), generator=g))
        shape = tuple(int(s) for s in torch.randint(1, 6, (nd,), generator=g))
        dtype = [torch.float64, torch.float32, torch.int64, torch.bool][int(torch.randint(0, 4, (1,), generator=g))]
        x = torch.randn(shape, generator=g).to(dtype) if dtype != torch.bool else torch.randn(shape, generator=g) > 0
        k = int(torch.randint(1, nd + 1, (1,), generator=g))
        dims = tuple(int(d) - (nd if bool(torch.rand(1, generator=g) < 0.5) else 0)
                     for d in torch.randperm(nd, generator=g)[:k])
        shifts = tuple(int(s) for s in torch.randint(-12, 13, (k,), generator=g))
        assert torch.equal(_roll(x, shifts, dims), torch.roll(x, shifts, dims)), (shape, shifts, dims)
        s0 = shifts[0]
        assert torch.equal(_roll(x, s0), torch.roll(x, s0)), (shape, s0)  # no dims: the flattened tensor
    assert _roll(torch.zeros(3, 4), (1, 2), (0,)) is NotImplemented


# ------------------------------------------------------------------------------------------ addcmul
@pytest.mark.parametrize("seed", SEEDS)
def test_unfused_definitions_match_the_kernels(seed):
    g = torch.Generator().manual_seed(seed)
    for op, ref in ((aten.addcmul.default, torch.addcmul), (aten.addcdiv.default, torch.addcdiv)):
        fn = UNFUSE[op]
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for value in (1, -1, 0.5, 3.0, 0):
                a, b = torch.randn(3, 4, generator=g).to(dtype), torch.randn(3, 1, generator=g).to(dtype)
                c = torch.randn(4, generator=g).to(dtype) + 3.0  # (addcdiv: no division by ~0)
                tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
                torch.testing.assert_close(fn(a, b, c, value=value), ref(a, b, c, value=value), rtol=tol, atol=tol)
        x = torch.randn(2, 2, generator=g, dtype=torch.float64)
        assert fn(x, x.float(), x) is NotImplemented  # mixed dtypes: kept whole
        assert fn(x.long(), x.long(), x.long()) is NotImplemented  # integer: kept whole
        assert fn(x, x, x, value=True) is NotImplemented


# ------------------------------------------------------------------------------------------ signs
def _sign_case(g, shape, dim, dtype):
    """A ±1 constant varying along ``dim`` only (random runs), broadcast-shaped [.., n, ..] or [n]."""
    n = shape[dim]
    line = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    view = [1] * len(shape)
    view[dim] = n
    k = line.view(view).to(dtype)
    if dim == len(shape) - 1 and bool(torch.rand(1, generator=g) < 0.5):
        k = line.to(dtype)  # a vector, broadcast like `x * sign`
    return k


@pytest.mark.parametrize("seed", SEEDS)
def test_sign_blocks_is_bitwise_the_product(seed):
    g = torch.Generator().manual_seed(seed)
    mul = ew_spec(aten.mul.Tensor, 2)
    rewritten = 0
    for _ in range(30):
        nd = int(torch.randint(1, 4, (1,), generator=g))
        shape = tuple(int(s) for s in torch.randint(1, 6, (nd,), generator=g))
        dim = int(torch.randint(0, nd, (1,), generator=g))
        dtype = [torch.float64, torch.float32, torch.bfloat16][int(torch.randint(0, 3, (1,), generator=g))]
        x = torch.randn(shape, generator=g).to(dtype)
        flat = x.view(-1)
        for i, special in enumerate((0.0, -0.0, float("inf"), float("-inf"), float("nan"))):
            if i < flat.numel():
                flat[i] = special
        k = _sign_case(g, shape, dim, dtype)
        S = ExprStore()
        a = S.atom("a", shape, dtype)
        for order in ((a, _value(S, k)), (_value(S, k), a)):
            term = S.call(mul, list(order))
            out = sign_blocks(S, term)
            rewritten += out is not term
            got = evaluate(out, lambda e: x)
            want = x * k if order[0] is a else k * x
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            keep = ~torch.isnan(want)
            assert torch.equal(got[keep], want[keep])
            assert torch.equal(torch.signbit(got[keep]), torch.signbit(want[keep]))  # -0.0 stays -0.0
    assert rewritten > 30


def test_sign_blocks_declines():
    mul = ew_spec(aten.mul.Tensor, 2)
    S = ExprStore()
    a = S.atom("a", (3, 4), torch.float64)
    for k in (torch.tensor([-1.0, 2.0, 1.0, 1.0], dtype=torch.float64),  # not a sign
              torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]],
                           dtype=torch.float64),  # varies along two dims
              torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float32)):  # another dtype (promotes)
        term = S.call(mul, [a, _value(S, k)])
        assert sign_blocks(S, term) is term
    b = S.atom("b", (3, 4), torch.float64)
    term = S.call(mul, [a, b])
    assert sign_blocks(S, term) is term  # no constant
    small = S.atom("s", (1, 4), torch.float64)  # the data broadcast by the constant: shape changes
    term = S.call(mul, [small, _value(S, torch.ones(3, 4, dtype=torch.float64))])
    assert sign_blocks(S, term) is term


# ------------------------------------------------------------------------------------------ sums
def _sum(S, x, dims, keep=False):
    return S.call(reduce_spec("sum", dims, keep), [x])


@pytest.mark.parametrize("seed", SEEDS)
def test_adjacent_slice_sums_merge_and_only_those(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        n, m = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        d = int(torch.randint(0, 2, (1,), generator=g))
        shape = (n, m) if d == 0 else (m, n)
        dims = (d,) if bool(torch.rand(1, generator=g) < 0.5) else (0, 1)
        keep = bool(torch.rand(1, generator=g) < 0.5)
        S = ExprStore()
        F = LinearForms(S, budget=200)
        x = S.atom("x", shape, torch.float64)
        cuts = sorted({0, n} | {int(c) for c in torch.randint(1, n, (2,), generator=g)})
        pieces = [_sum(S, S.slice(x, d, a, b), dims, keep) for a, b in zip(cuts, cuts[1:])]
        whole = _sum(S, x, dims, keep)
        total = S.accum("sum", pieces) if len(pieces) > 1 else pieces[0]
        assert F.ratio(total, whole) == 1
        xv = torch.randn(shape, generator=g, dtype=torch.float64)
        form = F.of(total)
        val = sum(float(c) * evaluate(b, lambda e: xv) for b, c in form)
        torch.testing.assert_close(val, evaluate(total, lambda e: xv))
        if len(pieces) > 2:  # a piece missing, or counted with another coefficient: not the whole
            part = S.accum("sum", pieces[1:])
            assert F.ratio(part, whole) is None
            skew = S.accum("sum", [S.scale(pieces[0], Fraction(2))] + pieces[1:])
            assert F.ratio(skew, whole) is None
        # slices along a kept dim: one element long, two same-shaped bases add up to a sum over that
        # dim too (their sum is); longer ones never merge (different shapes or not one sum)
        other = 1 - d
        if other not in dims and shape[other] >= 4:
            for lo, hi in ((0, 1), (0, 2)):
                sl = S.accum("sum", [_sum(S, S.slice(x, other, lo, hi), dims, keep),
                                     _sum(S, S.slice(x, other, hi, 2 * hi), dims, keep)])
                form = F.of(sl)
                assert len(form) == (1 if hi == 1 else 2)
                val = sum(float(c) * evaluate(b, lambda e: xv) for b, c in form)
                torch.testing.assert_close(val, evaluate(sl, lambda e: xv))


# ------------------------------------------------------------------------------------------ zero buffers
def _proj(x, w):
    return torch.tanh(x @ w)


def _gather_cols(order, overlap=False, skip=None):
    """A rank program: zeros, write my block at slot order[rank] (cols), all-reduce."""
    def prog(x, w):
        y = torch.tanh(x @ w)
        n, world, rank = y.shape[1], dist.get_world_size(), dist.get_rank()
        out = torch.zeros(x.shape[0], n * world, dtype=y.dtype)
        slot = order[rank]
        if skip is None or rank != skip:
            out[:, slot * n:(slot + 1) * n + (1 if overlap and slot + 1 < world else 0)] = (
                y if not (overlap and slot + 1 < world) else torch.cat([y, y[:, :1]], 1))
        dist.all_reduce(out)
        return out
    return prog


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zero_buffer_gathers(world):
    g = torch.Generator().manual_seed(world)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 2 * world, generator=g, dtype=torch.float64)
    common = dict(sequential=_proj, inputs=[x, w], placements=[gg.Replicate(), gg.Shard(1)], world_size=world,
                  expect=[gg.Replicate()])
    ok = gg.verify(gg.Problem(distributed=_gather_cols(list(range(world))), **common), capture="inprocess")
    assert ok.status is gg.Status.PROVED, ok
    wrongs = {
        "reversed": _gather_cols(list(range(world))[::-1]),
        "overlap": _gather_cols(list(range(world)), overlap=True),
        "a rank writes nothing": _gather_cols(list(range(world)), skip=world - 1),
        "two ranks, one slot": _gather_cols([0] * world),
    }
    for why, prog in wrongs.items():
        r = gg.verify(gg.Problem(distributed=prog, **common), capture="inprocess")
        assert r.status is not gg.Status.PROVED, why


# ------------------------------------------------------------------------------------------ products
@pytest.mark.parametrize("seed", SEEDS)
def test_products_in_one_order(seed):
    """Random product trees (with silu) of same-shaped factors: one normal form for every order and
    grouping, equal in value to the tree; a broadcast factor or another dtype keeps its own form."""
    from gg_notebook.relations.products import MUL, SILU, canonical_product

    g = torch.Generator().manual_seed(seed)
    for _ in range(15):
        shape = tuple(int(s) for s in torch.randint(1, 5, (2,), generator=g))
        S = ExprStore()
        F = LinearForms(S, budget=200)
        atoms = [S.atom(f"a{i}", shape, torch.float64) for i in range(3)]
        vals = {f"a{i}": torch.randn(shape, generator=g, dtype=torch.float64) for i in range(3)}
        vals["a0"].view(-1)[0] = 0.0
        leaf = lambda e: vals[e.attrs[0]]  # noqa: E731
        a, b, c = atoms
        silu_c = S.call(SILU, [c])
        spellings = [
            S.call(MUL, [S.call(MUL, [a, b]), silu_c]),
            S.call(MUL, [silu_c, S.call(MUL, [b, a])]),
            S.call(MUL, [S.call(MUL, [S.call(MUL, [a, S.call(ew_spec(aten.sigmoid.default, 1), [c])]), c]), b]),
            S.call(MUL, [b, S.call(MUL, [c, S.call(MUL, [S.call(ew_spec(aten.sigmoid.default, 1), [c]), a])])]),
        ]
        want = evaluate(spellings[0], leaf)
        for t in spellings:
            assert F.ratio(t, spellings[0]) == 1
            canon = canonical_product(S, t)
            if canon is not None:
                torch.testing.assert_close(evaluate(canon, leaf), want)
        # not the same value: a factor missing, a factor twice
        assert F.ratio(S.call(MUL, [S.call(MUL, [a, b]), c]), spellings[0]) is None
        assert F.ratio(S.call(MUL, [S.call(MUL, [a, a]), silu_c]), spellings[0]) is None
        # a broadcast factor stays whole (no reordering across shapes)
        row = S.atom("r", (1, shape[1]), torch.float64)
        t = S.call(MUL, [S.call(MUL, [a, row]), b])
        assert canonical_product(S, S.call(MUL, [a, row])) is None
        vals["r"] = torch.randn(1, shape[1], generator=g, dtype=torch.float64)
        form = F.of(t)
        torch.testing.assert_close(sum(float(k) * evaluate(x, leaf) for x, k in form), evaluate(t, leaf))
