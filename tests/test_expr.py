"""Randomized tests of the normalizing constructors of `gg_notebook.relations.expr`.

Every normalization the constructors perform (views and slices pushed below concatenations,
nested concatenations flattened, adjacent slices merged, permutations composed, identities
dropped) must be an identity over real numbers. Each test builds expressions over ``atom``
leaves holding random values and compares `evaluate` with the same operations done directly in
torch on those values (shape and value), and sometimes also checks the normal form reached.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from gg_notebook.relations.expr import ExprStore, ShapeError, evaluate, pretty, reshape_groups

SEEDS = range(8)


class Env:
    """An ExprStore plus the concrete value of every atom."""

    def __init__(self, seed: int = 0):
        self.S = ExprStore()
        self.values: dict[str, torch.Tensor] = {}
        self.rng = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)

    def atom(self, shape, name=None):
        name = name or f"x{len(self.values)}"
        v = torch.randn(*shape, generator=self.g, dtype=torch.float64)
        self.values[name] = v
        return self.S.atom(name, tuple(shape), torch.float64), v

    def cat_atoms(self, shape, dim, pieces=None):
        """An atom-per-piece concatenation along ``dim`` (uneven pieces) and its torch value."""
        sizes = pieces or split_sizes(self.rng, shape[dim], self.rng.randint(2, 4))
        parts, vals = [], []
        for s in sizes:
            ps = list(shape)
            ps[dim] = s
            e, v = self.atom(ps)
            parts.append(e)
            vals.append(v)
        return self.S.cat(parts, dim), torch.cat(vals, dim)

    def ev(self, e):
        return evaluate(e, lambda x: self.values[x.attrs[0]])

    def check(self, e, expected: torch.Tensor):
        got = self.ev(e)
        assert tuple(e.shape) == tuple(expected.shape), (e.shape, expected.shape)
        assert tuple(got.shape) == tuple(expected.shape), (got.shape, expected.shape)
        assert torch.equal(got, expected), pretty(e, lambda x: x.attrs[0])


def split_sizes(rng: random.Random, total: int, pieces: int) -> list[int]:
    pieces = max(1, min(pieces, total))
    cuts = sorted(rng.sample(range(1, total), pieces - 1)) if pieces > 1 else []
    b = [0] + cuts + [total]
    return [y - x for x, y in zip(b, b[1:])]


def random_shape(rng: random.Random, ndim=None, lo=1, hi=6):
    ndim = ndim if ndim is not None else rng.randint(1, 4)
    return [rng.randint(lo, hi) for _ in range(ndim)]


def _factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def random_reshape(rng: random.Random, shape) -> list[int]:
    """A random target shape reached by splitting dims into prime factors, regrouping adjacent
    factors (merges across dims included) and sprinkling size-1 dims."""
    factors = [f for s in shape for f in _factors(s)]
    out, cur = [], 1
    for f in factors:
        cur *= f
        if rng.random() < 0.5:
            out.append(cur)
            cur = 1
    if cur > 1 or not out:
        out.append(cur)
    for _ in range(rng.randint(0, 2)):
        out.insert(rng.randint(0, len(out)), 1)
    return out


# --------------------------------------------------------------------------- hash-consing
def test_hash_consing_same_expression_same_object():
    env = Env(0)
    S = env.S
    x, _ = env.atom((4, 6), "x")
    assert S.atom("x", (4, 6), torch.float64) is x
    assert S.atom("x", (6, 4), torch.float64) is not x  # same name and dtype, another shape: another leaf
    assert S.view(x, (2, 12)) is S.view(x, (2, 12))
    assert S.view(x, (24,)) is S.view(x, (-1,))
    assert S.permute(x, (1, 0)) is S.transpose(x, 0, 1)
    assert S.slice(x, 1, 1, 4) is S.slice(x, -1, 1, -2)
    y, _ = env.atom((4, 6), "y")
    assert S.cat([x, y], 0) is S.cat([x, y], 0)
    assert S.cat([x, y], 0) is not S.cat([y, x], 0)
    assert S.accum("sum", [x, y]) is S.accum("sum", [x, y])
    assert S.accum("sum", [x, y]) is not S.accum("max", [x, y])
    n_nodes = len(S.nodes)
    S.cat([S.view(x, (2, 12)), S.view(y, (2, 12))], 1)
    S.cat([S.view(x, (2, 12)), S.view(y, (2, 12))], 1)
    assert len(S.nodes) == n_nodes + 2  # view(y) and the cat, once each


def test_cat_of_covering_slices_is_base():
    env = Env(1)
    S = env.S
    n = 7
    x, _ = env.atom((n, 3), "x")
    assert S.cat([S.slice(x, 0, 0, 2), S.slice(x, 0, 2, n)], 0) is x
    assert S.slice(x, 0, 0, n) is x
    # three pieces, and a partial cover collapses to one slice of the base
    assert S.cat([S.slice(x, 0, 0, 1), S.slice(x, 0, 1, 4), S.slice(x, 0, 4, 7)], 0) is x
    part = S.cat([S.slice(x, 0, 1, 3), S.slice(x, 0, 3, 5)], 0)
    assert part is S.slice(x, 0, 1, 5)


# --------------------------------------------------------------------------- view
@pytest.mark.parametrize("seed", SEEDS)
def test_view_random_reshapes(seed):
    env = Env(seed)
    S = env.S
    for _ in range(10):
        shape = random_shape(env.rng)
        x, v = env.atom(shape)
        t1 = random_reshape(env.rng, shape)
        t2 = random_reshape(env.rng, t1)
        e1 = S.view(x, t1)
        env.check(e1, v.reshape(t1))
        e2 = S.view(e1, t2)
        env.check(e2, v.reshape(t2))
        assert e2 is x or e2.args[0] is x  # view of view collapses
        assert S.view(x, shape) is x


def test_view_merge_of_concatenated_dim_is_pushed():
    env = Env(2)
    S = env.S
    # concatenation along the outer dim, merged with the inner one: [4+3, 5] -> [35]
    c, v = env.cat_atoms((7, 5), 0, pieces=[4, 3])
    e = S.view(c, (35,))
    assert e.op == "cat" and all(a.op == "view" for a in e.args)
    env.check(e, v.reshape(35))
    # leading size-1 dims before the concatenated dim do not block the push
    c, v = env.cat_atoms((1, 6, 4), 1, pieces=[2, 4])
    e = S.view(c, (24,))
    assert e.op == "cat"
    env.check(e, v.reshape(24))
    # an outer dim of size > 1 in the same group blocks it (the pieces interleave)
    c, v = env.cat_atoms((2, 6), 1, pieces=[3, 3])
    e = S.view(c, (12,))
    assert e.op == "view"
    env.check(e, v.reshape(12))


def test_view_split_of_concatenated_dim_is_pushed():
    env = Env(3)
    S = env.S
    # [6+9, 2] viewed as [5, 3, 2]: pieces are multiples of 3 -> cat of [2,3,2] and [3,3,2]
    c, v = env.cat_atoms((15, 2), 0, pieces=[6, 9])
    e = S.view(c, (5, 3, 2))
    assert e.op == "cat" and e.attrs == 0
    assert [a.shape for a in e.args] == [(2, 3, 2), (3, 3, 2)]
    env.check(e, v.reshape(5, 3, 2))
    # pieces not a multiple of the inner factor: stays a view, still correct
    c, v = env.cat_atoms((15, 2), 0, pieces=[5, 10])
    e = S.view(c, (5, 3, 2))
    assert e.op == "view"
    env.check(e, v.reshape(5, 3, 2))
    # inner dims of the concatenated group: [2, 4+2] -> [2, 2, 3] with pieces split per row
    c, v = env.cat_atoms((2, 6), 1, pieces=[3, 3])
    e = S.view(c, (2, 2, 3))
    assert e.op == "cat" and e.attrs == 1
    env.check(e, v.reshape(2, 2, 3))


@pytest.mark.parametrize("seed", SEEDS)
def test_view_of_cat_random(seed):
    env = Env(100 + seed)
    S = env.S
    pushed = 0
    for _ in range(25):
        shape = random_shape(env.rng, lo=1, hi=6)
        d = env.rng.randrange(len(shape))
        if shape[d] < 2:
            shape[d] = env.rng.randint(2, 8)
        # piece sizes that are often multiples of small factors, so splits can be pushed
        unit = env.rng.choice([1, 2, 3])
        shape[d] = shape[d] * unit
        sizes = [s * unit for s in split_sizes(env.rng, shape[d] // unit, env.rng.randint(2, 3))]
        c, v = env.cat_atoms(shape, d, pieces=sizes)
        target = random_reshape(env.rng, shape)
        e = S.view(c, target)
        pushed += e.op == "cat"
        env.check(e, v.reshape(target))
        # and back again
        env.check(S.view(e, shape), v)
    assert pushed > 0  # the push-down path was exercised


def test_view_of_accum_and_expand():
    env = Env(4)
    S = env.S
    x, vx = env.atom((4, 6))
    y, vy = env.atom((4, 6))
    a = S.accum("sum", [x, y])
    e = S.view(a, (2, 2, 6))
    assert e.op == "accum"
    env.check(e, (vx + vy).reshape(2, 2, 6))
    m = S.view(S.accum("max", [x, y]), (24,))
    env.check(m, torch.maximum(vx, vy).reshape(24))
    z, vz = env.atom((1, 6))
    ex = S.expand(z, (4, 6))
    env.check(S.view(ex, (24,)), vz.expand(4, 6).reshape(24))


# --------------------------------------------------------------------------- permute
@pytest.mark.parametrize("seed", SEEDS)
def test_permute_compositions(seed):
    env = Env(200 + seed)
    S = env.S
    for _ in range(10):
        shape = random_shape(env.rng, ndim=env.rng.randint(2, 5), lo=2)  # (size-1 dims: see below)
        x, v = env.atom(shape)
        e, ref = x, v
        for _ in range(env.rng.randint(1, 4)):
            p = list(range(len(shape)))
            env.rng.shuffle(p)
            e, ref = S.permute(e, p), ref.permute(p)
            env.check(e, ref)
            assert e is x or (e.op == "permute" and e.args[0] is x)  # compositions collapse
        # the inverse permutation gets back to the atom itself
        if e is not x:
            inv = [0] * len(e.attrs)
            for i, p in enumerate(e.attrs):
                inv[p] = i
            assert S.permute(e, inv) is x


@pytest.mark.parametrize("seed", SEEDS)
def test_permute_of_view(seed):
    """permute(view(x)) is rewritten to view(permute(x)) when whole view groups move; always an identity."""
    env = Env(250 + seed)
    S = env.S
    moved = 0
    for _ in range(15):
        shape = random_shape(env.rng, ndim=env.rng.randint(2, 4), lo=1, hi=5)
        x, v = env.atom(shape)
        t = random_reshape(env.rng, shape)
        if len(t) < 2:
            continue
        p = list(range(len(t)))
        env.rng.shuffle(p)
        e = S.permute(S.view(x, t), p)
        moved += e.op == "view"
        env.check(e, v.reshape(t).permute(p))
    # heads-style: [B, S, H*D] -> [B, S, H, D] -> [B, H, S, D] moves whole groups
    x, v = env.atom((2, 3, 4, 5))
    m = S.view(x, (6, 4, 5))
    e = S.permute(m, (1, 2, 0))
    env.check(e, v.reshape(6, 4, 5).permute(1, 2, 0))
    assert moved > 0


def test_permute_of_cat_and_accum():
    env = Env(5)
    S = env.S
    c, v = env.cat_atoms((5, 3, 4), 0)
    e = S.permute(c, (2, 0, 1))
    assert e.op == "cat" and e.attrs == 1
    env.check(e, v.permute(2, 0, 1))
    x, vx = env.atom((3, 4))
    y, vy = env.atom((3, 4))
    a = S.permute(S.accum("min", [x, y]), (1, 0))
    assert a.op == "accum"
    env.check(a, torch.minimum(vx, vy).t())
    env.check(S.transpose(c, -1, 0), v.transpose(-1, 0))


# --------------------------------------------------------------------------- slice
@pytest.mark.parametrize("seed", SEEDS)
def test_slice_of_slice(seed):
    env = Env(300 + seed)
    S = env.S
    for _ in range(10):
        shape = random_shape(env.rng, lo=3, hi=9)
        x, v = env.atom(shape)
        d = env.rng.randrange(len(shape))
        a = env.rng.randrange(shape[d])
        b = env.rng.randint(a + 1, shape[d])
        s1 = S.slice(x, d, a, b)
        aa = env.rng.randrange(b - a)
        bb = env.rng.randint(aa + 1, b - a)
        s2 = S.slice(s1, d, aa, bb)
        env.check(s2, v.narrow(d, a, b - a).narrow(d, aa, bb - aa))
        assert s2 is x or s2.args[0] is x  # nested slices along one dim collapse
        # negative bounds
        env.check(S.slice(x, d, -shape[d], -1), v.narrow(d, 0, shape[d] - 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_slice_of_cat_across_boundaries(seed):
    env = Env(400 + seed)
    S = env.S
    for _ in range(10):
        shape = random_shape(env.rng, ndim=env.rng.randint(1, 3), lo=2, hi=5)
        d = env.rng.randrange(len(shape))
        shape[d] = env.rng.randint(4, 12)
        c, v = env.cat_atoms(shape, d)
        a = env.rng.randrange(shape[d])
        b = env.rng.randint(a + 1, shape[d])
        e = S.slice(c, d, a, b)
        env.check(e, v.narrow(d, a, b - a))
        # a slice inside one piece is a slice of that piece (no cat left)
        lo = 0
        for p in c.args:
            hi = lo + p.shape[d]
            if a >= lo and b <= hi:
                assert e is p or (e.op == "slice" and e.args[0] is p)
            lo = hi
        # slicing another dim distributes over the pieces
        if len(shape) > 1:
            o = (d + 1) % len(shape)
            f = S.slice(c, o, 1, shape[o])
            assert f.op == "cat" and f.attrs == d
            env.check(f, v.narrow(o, 1, shape[o] - 1))
        # slice a cat back together from its own slices
        k = env.rng.randint(1, shape[d] - 1)
        back = S.cat([S.slice(c, d, 0, k), S.slice(c, d, k, shape[d])], d)
        env.check(back, v)
        assert back is c


@pytest.mark.parametrize("seed", SEEDS)
def test_slice_of_view(seed):
    """slice(view(y)) is rewritten to view(slice(y)) when the bounds align with the view group."""
    env = Env(450 + seed)
    S = env.S
    moved = 0
    for _ in range(20):
        shape = random_shape(env.rng, ndim=env.rng.randint(1, 3), lo=1, hi=6)
        if env.rng.random() < 0.5:
            d = env.rng.randrange(len(shape))
            shape[d] = max(shape[d], 2)
            x, v = env.cat_atoms(shape, d) if shape[d] > 1 else env.atom(shape)
        else:
            x, v = env.atom(shape)
        t = random_reshape(env.rng, shape)
        e = S.view(x, t)
        dd = env.rng.randrange(len(t))
        if t[dd] < 2:
            continue
        a = env.rng.randrange(t[dd])
        b = env.rng.randint(a + 1, t[dd])
        s = S.slice(e, dd, a, b)
        moved += s.op == "view"
        env.check(s, v.reshape(t).narrow(dd, a, b - a))
    # the attention pattern: rows of a merged [B*H, ...] view are whole heads of [B, H, ...]
    x, v = env.atom((2, 3, 4))
    s = S.slice(S.view(x, (6, 4)), 0, 3, 6)  # rows 3:6 = x[1]
    assert s.op == "view" and s.args[0] is S.slice(x, 0, 1, 2)
    env.check(s, v.reshape(6, 4)[3:6])
    s = S.slice(S.view(x, (6, 4)), 0, 2, 4)  # straddles x[0] and x[1]: stays a slice
    assert s.op == "slice"
    env.check(s, v.reshape(6, 4)[2:4])
    assert moved > 0


def test_slice_of_permute_accum_expand():
    env = Env(6)
    S = env.S
    x, vx = env.atom((3, 5, 4))
    p = S.permute(x, (2, 0, 1))  # [4, 3, 5]
    e = S.slice(p, 0, 1, 3)
    assert e.op == "permute" and e.args[0].op == "slice"
    env.check(e, vx.permute(2, 0, 1)[1:3])
    env.check(S.slice(p, 2, 2, 5), vx.permute(2, 0, 1)[:, :, 2:5])

    y, vy = env.atom((3, 5, 4))
    a = S.accum("sum", [x, y])
    e = S.slice(a, 1, 1, 4)
    assert e.op == "accum" and all(t.op == "slice" for t in e.args)
    env.check(e, (vx + vy)[:, 1:4])

    z, vz = env.atom((1, 5))
    ex = S.expand(z, (2, 6, 5))  # new leading dim, broadcast dim 1
    env.check(S.slice(ex, 0, 0, 1), vz.expand(2, 6, 5)[0:1])
    s = S.slice(ex, 1, 2, 5)
    assert s.op == "expand" and s.args[0] is z
    env.check(s, vz.expand(2, 6, 5)[:, 2:5])
    s = S.slice(ex, 2, 1, 3)  # a real (non-broadcast) dim: a plain slice node
    env.check(s, vz.expand(2, 6, 5)[:, :, 1:3])


# --------------------------------------------------------------------------- cat
@pytest.mark.parametrize("seed", SEEDS)
def test_cat_nested_and_merging(seed):
    env = Env(500 + seed)
    S = env.S
    shape = random_shape(env.rng, ndim=3, lo=2, hi=5)
    d = env.rng.randrange(3)
    xs = [env.atom([s if i != d else env.rng.randint(1, 4) for i, s in enumerate(shape)]) for _ in range(4)]
    es, vs = [e for e, _ in xs], [v for _, v in xs]
    flat = S.cat(es, d)
    nested = S.cat([S.cat(es[:2], d), S.cat([es[2], S.cat(es[3:], d)], d)], d)
    assert nested is flat and len(flat.args) == 4
    env.check(nested, torch.cat(vs, d))
    # a cat along another dim is not flattened (the nesting is canonical: outer along the smaller dim)
    o = (d + 1) % 3
    mixed = S.cat([S.cat(es[:2], d), S.cat(es[:2], d)], o)
    assert mixed.op == "cat" and mixed.attrs == min(d, o)
    env.check(mixed, torch.cat([torch.cat(vs[:2], d)] * 2, o))
    # adjacent slices of one base merge back into the base, non-adjacent ones stay apart
    base, vb = env.atom([6 if i == d else s for i, s in enumerate(shape)])
    cuts = sorted(env.rng.sample(range(1, 6), 2))
    pieces = [S.slice(base, d, a, b) for a, b in zip([0] + cuts, cuts + [6])]
    assert S.cat(pieces, d) is base
    swapped = S.cat([pieces[1], pieces[0]], d)
    assert swapped.op == "cat"
    env.check(swapped, torch.cat([vb.narrow(d, cuts[0], cuts[1] - cuts[0]), vb.narrow(d, 0, cuts[0])], d))
    single = S.cat([es[0]], d)
    assert single is es[0]


def test_cat_shape_errors():
    env = Env(7)
    S = env.S
    x, _ = env.atom((2, 3))
    y, _ = env.atom((2, 4))
    with pytest.raises(ShapeError):
        S.cat([x, y], 0)
    with pytest.raises(ShapeError):
        S.cat([], 0)
    with pytest.raises(ShapeError):
        S.view(x, (5,))
    with pytest.raises(ShapeError):
        S.permute(x, (0, 0))
    with pytest.raises(ShapeError):
        S.accum("sum", [x, y])


# --------------------------------------------------------------------------- accum / expand
@pytest.mark.parametrize("fn,op", [("sum", torch.add), ("max", torch.maximum), ("min", torch.minimum)])
def test_accum_flattening(fn, op):
    env = Env(8)
    S = env.S
    xs = [env.atom((3, 4)) for _ in range(4)]
    es, vs = [e for e, _ in xs], [v for _, v in xs]
    nested = S.accum(fn, [S.accum(fn, es[:2]), S.accum(fn, es[2:])])
    assert nested is S.accum(fn, es) and len(nested.args) == 4
    ref = vs[0]
    for v in vs[1:]:
        ref = op(ref, v)
    got = env.ev(nested)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert S.accum(fn, [es[0]]) is es[0]
    other = "max" if fn != "max" else "sum"
    mixed = S.accum(fn, [S.accum(other, es[:2]), es[2]])
    assert len(mixed.args) == 2  # a different combiner is not flattened
    with pytest.raises(ValueError):
        S.accum("prod", es)


def test_expand():
    env = Env(9)
    S = env.S
    x, v = env.atom((3, 1))
    e = S.expand(x, (2, 3, 4))
    env.check(e, v.expand(2, 3, 4))
    assert S.expand(x, (3, 1)) is x
    assert S.expand(x, (-1, 4)) is S.expand(x, (3, 4))
    env.check(S.expand(x, (-1, 4)), v.expand(3, 4))


# --------------------------------------------------------------------------- random compositions
@pytest.mark.parametrize("seed", SEEDS)
def test_random_compositions(seed):
    """Random chains of clean ops on a concatenation, mirrored in torch step by step."""
    env = Env(600 + seed)
    S = env.S
    rng = env.rng
    for _ in range(6):
        shape = random_shape(rng, ndim=rng.randint(1, 3), lo=2, hi=6)
        d = rng.randrange(len(shape))
        shape[d] = rng.randint(3, 10)
        e, v = env.cat_atoms(shape, d)
        for step in range(8):
            kind = rng.choice(["view", "permute", "slice", "cat", "accum"])
            if kind == "view":
                t = random_reshape(rng, list(v.shape))
                e, v = S.view(e, t), v.reshape(t)
            elif kind == "permute" and v.dim() > 1:
                p = list(range(v.dim()))
                rng.shuffle(p)
                e, v = S.permute(e, p), v.permute(p)
            elif kind == "slice":
                dd = rng.randrange(v.dim())
                if v.shape[dd] > 1:
                    a = rng.randrange(v.shape[dd] - 1)
                    b = rng.randint(a + 1, v.shape[dd])
                    e, v = S.slice(e, dd, a, b), v.narrow(dd, a, b - a)
            elif kind == "cat":
                dd = rng.randrange(v.dim())
                if v.shape[dd] > 1:
                    k = rng.randint(1, v.shape[dd] - 1)
                    pieces = [S.slice(e, dd, 0, k), S.slice(e, dd, k, v.shape[dd])]
                    other, ov = env.atom(list(v.shape))
                    e = S.cat([pieces[0], other, pieces[1]], dd)
                    v = torch.cat([v.narrow(dd, 0, k), ov, v.narrow(dd, k, v.shape[dd] - k)], dd)
            else:
                other, ov = env.atom(list(v.shape))
                e, v = S.accum("sum", [e, other]), v + ov
            got = env.ev(e)
            assert tuple(e.shape) == tuple(v.shape)
            assert torch.allclose(got, v, rtol=1e-12, atol=1e-12), (step, kind)


# --------------------------------------------------------------------------- empty slices
def test_empty_slice_of_cat():
    env = Env(10)
    S = env.S
    c, v = env.cat_atoms((5, 3), 0, pieces=[2, 3])
    e = S.slice(c, 0, 2, 2)
    env.check(e, v[2:2])


def test_cat_of_empty_pieces():
    env = Env(11)
    S = env.S
    x, v = env.atom((4, 3))
    e = S.cat([S.slice(x, 0, 1, 1)], 0)
    env.check(e, v[1:1])


# --------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("src,dst,expected", [
    ((2, 3, 4), (6, 4), [([0, 1], [0]), ([2], [1])]),
    ((6, 4), (2, 3, 4), [([0], [0, 1]), ([1], [2])]),
    ((4, 6), (4, 2, 3), [([0], [0]), ([1], [1, 2])]),
    ((2, 1, 3), (6,), [([0, 1, 2], [0])]),
    ((1, 4), (4,), [([0, 1], [0])]),
    ((4,), (1, 4), [([0], [0, 1])]),
    ((6, 10), (4, 15), [([0, 1], [0, 1])]),
    ((2, 3), (7,), None),
])
def test_reshape_groups(src, dst, expected):
    got = reshape_groups(src, dst)
    assert got == expected
    if got is not None:  # every dim appears exactly once, groups multiply out
        assert sorted(i for g, _ in got for i in g) == list(range(len(src)))
        assert sorted(j for _, g in got for j in g) == list(range(len(dst)))
        for gi, go in got:
            assert math.prod(src[i] for i in gi) == math.prod(dst[j] for j in go)


def test_pretty():
    S = ExprStore()
    x = S.atom("x", (4, 6), torch.float64)
    y = S.atom("y", (4, 6), torch.float64)
    e = S.cat([S.slice(S.permute(x, (1, 0)), 1, 0, 2), S.accum("sum", [S.view(y, (6, 4)), S.view(x, (6, 4))])], 1)
    name = lambda a: a.attrs[0]  # noqa: E731
    assert pretty(x, name) == "x"
    assert pretty(S.slice(x, 1, 1, 3), name) == "x[:, 1:3]"
    assert pretty(S.view(x, (24,)), name) == "x.view(24)"
    assert pretty(S.expand(S.view(x, (1, 24)), (3, 24)), name) == "x.view(1, 24).expand(3, 24)"
    assert pretty(e, name) == "concat(x[0:2].permute(1, 0), sum(y.view(6, 4), x.view(6, 4)), dim=1)"
    assert pretty(S.scale(x, 0.5), name) == "0.5 * x"


@pytest.mark.parametrize("seed", SEEDS)
def test_nested_concatenations_along_two_dims_get_one_form(seed):
    """cat_e(cat_d(a0, a1), cat_d(b0, b1)) and cat_d(cat_e(a0, b0), cat_e(a1, b1)) are one node
    when the inner splits line up (a block layout written either way), and evaluate correctly."""
    env = Env(seed)
    S, rng = env.S, env.rng
    n = rng.randint(2, 4)
    shape = random_shape(rng, n, lo=2, hi=5)
    d, e = sorted(rng.sample(range(n), 2))
    rows = split_sizes(rng, shape[d], rng.randint(2, 3))
    cols = split_sizes(rng, shape[e], rng.randint(2, 3))
    blocks, vals = {}, {}
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            s = list(shape)
            s[d], s[e] = r, c
            blocks[i, j], vals[i, j] = env.atom(s)
    rows_first = S.cat([S.cat([blocks[i, j] for j in range(len(cols))], e) for i in range(len(rows))], d)
    cols_first = S.cat([S.cat([blocks[i, j] for i in range(len(rows))], d) for j in range(len(cols))], e)
    assert rows_first is cols_first
    want = torch.cat([torch.cat([vals[i, j] for j in range(len(cols))], e) for i in range(len(rows))], d)
    env.check(cols_first, want)
    assert cols_first.op == "cat" and cols_first.attrs == d  # the outer concatenation: the smaller dim


@pytest.mark.parametrize("seed", SEEDS)
def test_block_grid_of_consecutive_slices_is_one_concatenation(seed):
    """cat_d(cat_e(a[r0], b[r0]), cat_e(a[r1], b[r1])) (slices along d, e > d) is cat_e(a, b): the
    spelling whose inner concatenations join their slices (a sequence-sharded operand times a
    column-sharded weight); a grid whose columns skip rows, or mix values, stays a grid."""
    env = Env(4200 + seed)
    S, rng = env.S, env.rng
    n = rng.randint(2, 4)
    shape = random_shape(rng, n, lo=2, hi=6)
    d, e = sorted(rng.sample(range(n), 2))
    rows = split_sizes(rng, shape[d], rng.randint(2, 3))
    cols = split_sizes(rng, shape[e], rng.randint(2, 3))
    bases, vals = [], []
    for c in cols:
        s = list(shape)
        s[e] = c
        x, v = env.atom(s)
        bases.append(x)
        vals.append(v)
    bounds = [(sum(rows[:i]), sum(rows[:i + 1])) for i in range(len(rows))]
    grid = S.cat([S.cat([S.slice(b, d, lo, hi) for b in bases], e) for lo, hi in bounds], d)
    assert grid is S.cat(bases, e)
    env.check(grid, torch.cat(vals, e))
    # rows out of order: not the values' concatenation, stays a grid (and evaluates correctly)
    swapped = S.cat([S.cat([S.slice(b, d, lo, hi) for b in bases], e) for lo, hi in reversed(bounds)], d)
    assert swapped is not S.cat(bases, e)
    want = torch.cat([torch.cat([v.narrow(d, lo, hi - lo) for v in vals], e) for lo, hi in reversed(bounds)], d)
    env.check(swapped, want)
    # a column whose rows come from two values: stays a grid
    other, w = env.atom(bases[0].shape)
    mixed_cols = [[other if (i == 1 and j == 0) else b for j, b in enumerate(bases)] for i in range(len(bounds))]
    mixed = S.cat([S.cat([S.slice(b, d, lo, hi) for b in mixed_cols[i]], e)
                   for i, (lo, hi) in enumerate(bounds)], d)
    assert mixed is not S.cat(bases, e)
    mixed_vals = [[w if (i == 1 and j == 0) else v for j, v in enumerate(vals)] for i in range(len(bounds))]
    want = torch.cat([torch.cat([v.narrow(d, lo, hi - lo) for v in mixed_vals[i]], e)
                      for i, (lo, hi) in enumerate(bounds)], d)
    env.check(mixed, want)


def test_nested_concatenations_with_unaligned_splits_stay_nested():
    env = Env(0)
    S = env.S
    a0, v0 = env.atom((2, 3))
    a1, v1 = env.atom((2, 3))
    b0, w0 = env.atom((1, 3))
    b1, w1 = env.atom((3, 3))
    x = S.cat([S.cat([a0, a1], 0), S.cat([b0, b1], 0)], 1)
    env.check(x, torch.cat([torch.cat([v0, v1], 0), torch.cat([w0, w1], 0)], 1))
    assert x.attrs == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_permute_that_only_moves_size_one_dims_is_a_view(seed):
    env = Env(900 + seed)
    S = env.S
    shape = random_shape(env.rng, ndim=4, lo=2)
    shape[env.rng.randrange(4)] = 1
    x, v = env.atom(shape)
    ones = [i for i, n in enumerate(shape) if n == 1]
    real = [i for i, n in enumerate(shape) if n != 1]
    perm = list(real)
    for i in ones:  # put every size-1 dim anywhere, keep the others in order
        perm.insert(env.rng.randint(0, len(perm)), i)
    e = S.permute(x, perm)
    env.check(e, v.permute(perm))
    assert e is x or e.op == "view"
