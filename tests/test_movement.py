"""Data movement decided exactly (gg_notebook/relations/movement.py).

* the decision procedure: two pure data-movement expressions are called equal only if they are
  equal for random leaf values (soundness, on random pairs), and known-equal spellings (repeat_kv vs
  repeat_interleave, stack+flatten vs cat, permute/expand orders) are recognized;
* the expand-of-concatenation normalization of `ExprStore.expand` (randomized, against torch);
* re-tiling: rebuilds found by the index-tensor search evaluate to the target;
* pieces of a call on a concatenated operand evaluate to the slices of the call's value.
"""

from __future__ import annotations

import random

import pytest
import torch

from gg_notebook.engine.index import DVal
from gg_notebook.relations.expr import ExprStore, OpSpec, Slot, evaluate
from gg_notebook.relations.movement import MovementIndex, movement_of, retile

SEEDS = range(12)


class FakeIndex:
    """The parts of `DIndex` the movement index reads: a store, dvals, refs and users."""

    def __init__(self, store: ExprStore, terms=()):
        self.store = store
        self.dvals: list[DVal] = []
        self._users: dict[int, list] = {}
        for t in terms:
            self.add(t)

    def add(self, term, user=None):
        d = DVal(len(self.dvals), term)
        self.dvals.append(d)
        if user is not None:
            self._users.setdefault(term.id, []).append(user)
        return d

    def ref(self, d):
        return self.store.ref(d.id, d.term.shape, d.term.dtype)

    def users_of(self, term):
        return self._users.get(term.id, [])


def _vals(S, values):
    return lambda e: values[e.attrs[0]]


def _random_movement(rng: random.Random, S: ExprStore, x, depth: int = 4):
    """A random chain of view/permute/slice/expand/cat over expression ``x``."""
    e = x
    for _ in range(depth):
        k = rng.randrange(5)
        shape = list(e.shape)
        if k == 0 and len(shape) >= 2:  # merge two adjacent dims or split one
            i = rng.randrange(len(shape) - 1)
            new = shape[:i] + [shape[i] * shape[i + 1]] + shape[i + 2:]
            e = S.view(e, new)
        elif k == 1 and len(shape) >= 2:
            perm = list(range(len(shape)))
            rng.shuffle(perm)
            e = S.permute(e, perm)
        elif k == 2:
            d = rng.randrange(len(shape))
            if shape[d] >= 2:
                a = rng.randrange(shape[d] - 1)
                b = rng.randrange(a + 1, shape[d] + 1)
                e = S.slice(e, d, a, b)
        elif k == 3:
            d = rng.randrange(len(shape) + 1)
            shape.insert(d, 1)
            e = S.view(e, shape)
            shape[d] = rng.randint(2, 3)
            e = S.expand(e, shape)
        else:
            d = rng.randrange(len(shape))
            if shape[d] >= 2:
                cut = rng.randrange(1, shape[d])
                e = S.cat([S.slice(e, d, cut, shape[d]), S.slice(e, d, 0, cut)], d)
    return e


def _torch_equal_everywhere(S, a, b, atoms, seeds=3):
    for s in range(seeds):
        g = torch.Generator().manual_seed(100 + s)
        vals = {name: torch.randn(*shape, generator=g, dtype=torch.float64) for name, shape in atoms.items()}
        va, vb = evaluate(a, _vals(S, vals)), evaluate(b, _vals(S, vals))
        if va.shape != vb.shape or not torch.equal(va, vb):
            return False
    return True


@pytest.mark.parametrize("seed", SEEDS)
def test_equal_is_sound_on_random_pairs(seed):
    rng = random.Random(seed)
    S = ExprStore()
    shape = (rng.randint(2, 4), rng.randint(2, 4), rng.randint(2, 3))
    x = S.atom("x", shape, torch.float64)
    y = S.atom("y", shape, torch.float64)
    m = MovementIndex(FakeIndex(S))
    atoms = {"x": shape, "y": shape}
    found_equal = 0
    for _ in range(30):
        a = _random_movement(rng, S, S.cat([x, y], 0) if rng.random() < 0.3 else x)
        b = _random_movement(rng, S, S.cat([x, y], 0) if rng.random() < 0.3 else x)
        for p, q in ((a, b), (a, a), (a, S.view(S.view(a, (-1,)), a.shape))):
            if tuple(p.shape) != tuple(q.shape):
                continue
            eq = m.equal(p, q)
            truth = _torch_equal_everywhere(S, p, q, atoms)
            assert eq == truth, (eq, truth)
            found_equal += eq
    assert found_equal >= 30  # the reflexive pairs at least


def test_known_equal_spellings():
    S = ExprStore()
    b, kv, s, d, rep = 2, 3, 4, 2, 2
    k = S.atom("k", (b, kv, s, d), torch.float64)
    m = MovementIndex(FakeIndex(S))
    # repeat_kv: k[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv*rep, s, d)
    repeat_kv = S.view(S.expand(S.view(k, (b, kv, 1, s, d)), (b, kv, rep, s, d)), (b, kv * rep, s, d))
    # the same rows, transposed first: (repeat_kv(k)).transpose(-1, -2) vs repeat of k.transpose
    kt = S.permute(k, (0, 1, 3, 2))
    a = S.permute(repeat_kv, (0, 1, 3, 2))
    bb = S.view(S.expand(S.view(kt, (b, kv, 1, d, s)), (b, kv, rep, d, s)), (b, kv * rep, d, s))
    assert a.id != bb.id and m.equal(a, bb)
    # a tiled repeat (k.repeat(1, rep, 1, 1)) is different data movement
    tiled = S.view(S.expand(S.view(k, (b, 1, kv, s, d)), (b, rep, kv, s, d)), (b, kv * rep, s, d))
    assert not m.equal(repeat_kv, tiled)
    # stack((x1, x2), -2).flatten(-2) == cat((x1, x2), -1)
    x1, x2 = S.atom("x1", (2, 3), torch.float64), S.atom("x2", (2, 3), torch.float64)
    stacked = S.view(S.cat([S.view(x1, (2, 1, 3)), S.view(x2, (2, 1, 3))], 1), (2, 6))
    assert m.equal(stacked, S.cat([x1, x2], 1))
    # round-robin rows: stack([a, b], 1).flatten(0, 1) vs the interleaved concatenation of rows
    rr = S.view(S.cat([S.view(x1, (2, 1, 3)), S.view(x2, (2, 1, 3))], 1), (4, 3))
    inter = S.cat([S.slice(x1, 0, 0, 1), S.slice(x2, 0, 0, 1), S.slice(x1, 0, 1, 2), S.slice(x2, 0, 1, 2)], 0)
    assert m.equal(rr, inter)
    assert not m.equal(rr, S.cat([x1, x2], 0))


def test_equal_refuses_huge_tensors():
    S = ExprStore()
    x = S.atom("x", (4096, 4096), torch.float32)  # 16M elements: above the cap
    m = MovementIndex(FakeIndex(S))
    a = S.permute(S.permute(S.view(x, (64, 64, 4096)), (1, 0, 2)), (1, 0, 2))
    assert a.id == S.view(x, (64, 64, 4096)).id  # structural
    p = S.cat([S.slice(x, 0, 2048, 4096), S.slice(x, 0, 0, 2048)], 0)
    q = S.cat([S.slice(x, 0, 2048, 4096), S.slice(x, 0, 0, 2048)], 0)
    assert m.equal(p, q)  # same node
    r = S.view(S.permute(S.view(p, (2, 2048, 4096)), (1, 0, 2)), (2048, 8192))
    s_ = S.view(S.permute(S.view(p, (2, 2048, 4096)), (1, 0, 2)), (2048, 2, 4096))
    assert m.equal(r, S.view(s_, (2048, 8192)))  # same node after normalization
    other = S.view(S.permute(S.view(x, (2, 2048, 4096)), (1, 0, 2)), (2048, 8192))
    assert not m.equal(r, other)  # would need 16M-element index tensors: refused, not "equal"


@pytest.mark.parametrize("seed", SEEDS)
def test_expand_of_cat_normalization(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    S = ExprStore()
    n = rng.randint(2, 4)
    sizes = [rng.randint(1, 3) for _ in range(rng.randint(2, 3))]
    d = rng.randrange(3)
    vals, parts = {}, []
    for i, sz in enumerate(sizes):
        shape = [n, 1, 2]
        shape[d] = sz
        if d == 1:
            shape[2] = 1  # keep one broadcastable dim besides the concatenated one
        vals[f"p{i}"] = torch.randn(*shape, generator=g, dtype=torch.float64)
        parts.append(S.atom(f"p{i}", tuple(shape), torch.float64))
    x = S.cat(parts, d)
    want = torch.cat([vals[f"p{i}"] for i in range(len(sizes))], d)
    target = list(want.shape)
    for j in range(3):
        if j != d and target[j] == 1:
            target[j] = rng.randint(2, 3)
    lead = [rng.randint(1, 2)] if rng.random() < 0.5 else []
    e = S.expand(x, lead + target)
    assert e.op == "cat"  # pushed into the pieces
    got = evaluate(e, _vals(S, vals))
    assert torch.equal(got, want.expand(*(lead + target)))
    # expand of expand is one expand
    p = S.atom("q", (n, 1, 1), torch.float64)
    e2 = S.expand(S.expand(p, (n, 2, 1)), (2, n, 2, 3))
    assert e2.op == "expand" and e2.args[0].id == p.id
    vals["q"] = torch.randn(n, 1, 1, generator=g, dtype=torch.float64)
    assert torch.equal(evaluate(e2, _vals(S, vals)), vals["q"].expand(n, 2, 1).expand(2, n, 2, 3))


@pytest.mark.parametrize("seed", SEEDS)
def test_retile_rebuilds_the_target(seed):
    rng = random.Random(seed)
    S = ExprStore()
    s, h, d = 2 * rng.randint(1, 3), 2 * rng.randint(1, 2), rng.randint(1, 3)
    W = 2
    X = S.atom("X", (s, h, d), torch.float64)
    user = S.atom("u", (1,), torch.float64)  # stands for "some rank computes on it"
    idx = FakeIndex(S)
    cols = h // W
    for r in range(W):  # each rank holds the whole sequence of its heads, laid out [heads, seq, d]
        piece = S.permute(S.slice(X, 1, r * cols, (r + 1) * cols), (1, 0, 2))
        idx.add(piece, user=S.call(_NEG, [piece]))
    rels = retile(idx, X)
    assert rels, "no rebuild found"
    g = torch.Generator().manual_seed(seed)
    xv = torch.randn(s, h, d, generator=g, dtype=torch.float64)
    for rel in rels:
        got = evaluate(rel, lambda e: evaluate(idx.dvals[e.attrs[0]].term, lambda a: xv))
        assert torch.equal(got, xv)
    # a value with elements the target does not have is never used
    idx2 = FakeIndex(S)
    Y = S.atom("Y", (s, h, d), torch.float64)
    bad = S.cat([S.slice(X, 1, 0, cols), S.slice(Y, 1, 0, cols)], 1)
    idx2.add(bad, user=S.call(_NEG, [bad]))
    assert retile(idx2, X) == []


_NEG = OpSpec(kind="ew", name="aten.neg.default", target=torch.ops.aten.neg.default, template=((Slot(0),), ()))
_MM = OpSpec(kind="matmul", name="aten.mm.default", target=torch.ops.aten.mm.default,
             template=((Slot(0), Slot(1)), ()), params=(("einsum", "ik,kj->ij"),))


def test_pieces_of_a_call_on_a_concatenation():
    S = ExprStore()
    g = torch.Generator().manual_seed(0)
    x = S.atom("x", (3, 4), torch.float64)
    w = S.atom("w", (4, 12), torch.float64)
    local = S.cat([S.slice(w, 1, 0, 2), S.slice(w, 1, 4, 6), S.slice(w, 1, 8, 10)], 1)
    mm = S.call(_MM, [x, local])
    idx = FakeIndex(S)
    d = idx.add(mm)
    m = movement_of(idx)
    m.register_pieces(mm, d)
    vals = {"x": torch.randn(3, 4, generator=g, dtype=torch.float64),
            "w": torch.randn(4, 12, generator=g, dtype=torch.float64)}
    full = evaluate(mm, _vals(S, vals))
    for lo, hi, c0 in ((0, 2, 0), (2, 4, 4), (4, 6, 8)):
        piece = S.call(_MM, [x, S.slice(w, 1, c0, c0 + 2)])
        hit = m.piece(piece)
        assert hit is not None and hit[0] is d and hit[1:] == (1, lo, hi)
        assert torch.allclose(evaluate(piece, _vals(S, vals)), full[:, lo:hi])
    # a slice of w no rank multiplies is not a piece
    assert m.piece(S.call(_MM, [x, S.slice(w, 1, 2, 4)])) is None


# ---------------------------------------------------------------------- end to end: output layouts
import gg_notebook as gg  # noqa: E402


def _rows(t, r, W):
    return t[r::W]  # a strided slice: round-robin rows (clean data movement)


def _tanh_mm(x, w):
    return torch.tanh(x @ w)


def _tanh_mm_off(x, w):
    return torch.tanh(x @ w) * 1.001


def _cols_t(x, w):
    return (x @ w).t()


def _mm(x, w):
    return x @ w


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize("expect", ["layout", None])
def test_round_robin_output_layout(expect):
    L = gg.Layout(_rows, name="round-robin")
    p = gg.Problem(sequential=_tanh_mm, distributed=_tanh_mm, inputs=_inputs(), placements=[L, gg.Replicate()],
                   world_size=2, expect=[L] if expect else None)
    r = gg.verify(p, capture="inprocess")
    assert r.status is gg.Status.PROVED, r.headline()


def test_round_robin_output_layout_bug_refuted():
    L = gg.Layout(_rows, name="round-robin")
    p = gg.Problem(sequential=_tanh_mm, distributed=_tanh_mm_off, inputs=_inputs(),
                   placements=[L, gg.Replicate()], world_size=2, expect=[L])
    assert gg.verify(p, capture="inprocess").status is gg.Status.REFUTED
    # the right values in the wrong layout: every rank holds a contiguous half, expect says round-robin
    p = gg.Problem(sequential=_tanh_mm, distributed=_tanh_mm, inputs=_inputs(),
                   placements=[gg.Shard(0), gg.Replicate()], world_size=2, expect=[L])
    assert gg.verify(p, capture="inprocess").status is gg.Status.REFUTED


def test_expect_none_finds_a_transposed_concatenation():
    p = gg.Problem(sequential=_mm, distributed=_cols_t, inputs=_inputs(), placements=[gg.Replicate(), gg.Shard(1)],
                   world_size=2, expect=None)
    r = gg.verify(p, capture="inprocess")
    assert r.status is gg.Status.PROVED, r.headline()
    assert "permute" in r.relations[0].relation


def _gather_rows_written(x, w):
    import torch.distributed as dist

    y = torch.tanh(x @ w)
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    out = torch.empty(2 * y.shape[0], y.shape[1], dtype=y.dtype)
    for r, p in enumerate(parts):
        out[r::2] = p
    return out


def _gather_rows_half_written(x, w):
    import torch.distributed as dist

    y = torch.tanh(x @ w)
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    out = torch.empty(2 * y.shape[0], y.shape[1], dtype=y.dtype)
    out[0::2] = parts[0]  # the odd rows are never written
    return out


def test_buffer_filled_by_strided_writes():
    L = gg.Layout(_rows, name="round-robin")
    ok = gg.Problem(sequential=_tanh_mm, distributed=_gather_rows_written, inputs=_inputs(),
                    placements=[L, gg.Replicate()], world_size=2, expect=[gg.Replicate()])
    assert gg.verify(ok, capture="inprocess").status is gg.Status.PROVED
    half = gg.Problem(sequential=_tanh_mm, distributed=_gather_rows_half_written, inputs=_inputs(),
                      placements=[L, gg.Replicate()], world_size=2, expect=[gg.Replicate()])
    assert gg.verify(half, capture="inprocess", concrete=False).status is not gg.Status.PROVED
