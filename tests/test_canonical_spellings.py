"""Canonical spellings (issue #8, item 4, first part): one value, one form, whatever the spelling.

Each correct pair below is the same computation written two ways on a replicated input, so the
proof rests on exact lookup only: it goes through only if both spellings lower to the same terms.
Next to each, a wrong twin (a different dim, a partially written buffer, a non-zero beta) must not
be proved. The normalizations themselves are checked numerically against the real operators.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.ir.lower import DIM_OF_SELF, lower

R = gg.Replicate()
aten = torch.ops.aten


def _rn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def same(seq, other, inputs):
    return gg.verify(gg.Problem(seq, other, inputs, [R] * len(inputs), 2, expect=[R]))


SAME = {
    "softmax dim=-1 vs dim=2": (lambda x: torch.softmax(x, -1), lambda x: torch.softmax(x, dim=2), [_rn(2, 5, 4)]),
    "log_softmax method vs F": (lambda x: x.log_softmax(dim=-1), lambda x: F.log_softmax(x, 2), [_rn(2, 5, 4)]),
    "gather dim -1 vs 1": (lambda x, i: x.gather(-1, i), lambda x, i: torch.gather(x, 1, i),
                           [_rn(4, 6), torch.randint(0, 6, (4, 2), generator=torch.Generator().manual_seed(1))]),
    "cumsum -2 vs 0": (lambda x: x.cumsum(-2), lambda x: torch.cumsum(x, 0), [_rn(4, 6)]),
    "flip dims": (lambda x: x.flip(-1), lambda x: torch.flip(x, (1,)), [_rn(4, 6)]),
    "copy_ into empty_like": (lambda x: x * 2, lambda x: torch.empty_like(x).copy_(x * 2), [_rn(3, 4)]),
    "copy_ into empty, broadcast": (lambda x: x.expand(3, 4) + 0.0, lambda x: torch.empty(3, 4, dtype=x.dtype).copy_(x) + 0.0,
                                    [_rn(4)]),
    "copy_ into new_empty of another dtype": (lambda x: x.float(), lambda x: x.new_empty(x.shape, dtype=torch.float32).copy_(x),
                                              [_rn(3, 4)]),
    "baddbmm(empty, beta=0) vs bmm": (lambda a, b: torch.bmm(a, b),
                                      lambda a, b: torch.baddbmm(torch.empty(2, 5, 5, dtype=a.dtype), a, b, beta=0.0),
                                      [_rn(2, 5, 4), _rn(2, 4, 5, seed=2)]),
    "addmm(empty, beta=0) vs mm": (lambda a, b: a @ b, lambda a, b: torch.addmm(torch.empty(5, 3, dtype=a.dtype), a, b, beta=0),
                                   [_rn(5, 4), _rn(4, 3, seed=2)]),
    "F.linear vs 3-D matmul + bias": (lambda x, w, b: F.linear(x, w, b), lambda x, w, b: x @ w.t() + b,
                                      [_rn(2, 5, 4), _rn(3, 4, seed=1), _rn(3, seed=2)]),
    "2-D addmm then view vs 3-D matmul + bias": (
        lambda x, w, b: (torch.addmm(b, x.reshape(-1, 4), w.t())).view(2, 5, 3), lambda x, w, b: torch.matmul(x, w.t()) + b,
        [_rn(2, 5, 4), _rn(3, 4, seed=1), _rn(3, seed=2)]),
    "F.linear then gelu vs matmul, bias, gelu": (lambda x, w, b: F.gelu(F.linear(x, w, b)), lambda x, w, b: F.gelu(x @ w.T + b),
                                                 [_rn(2, 5, 4), _rn(3, 4, seed=1), _rn(3, seed=2)]),
    "assert is not a value": (lambda x: x + 1, lambda x: (torch._assert_async(x.abs().sum() >= 0), x + 1)[1], [_rn(3, 4)]),
    "even columns: stride 2 vs view and select": (lambda x: x[..., ::2] * 2, lambda x: x.view(3, 2, 2)[:, :, 0] * 2,
                                                  [_rn(3, 4)]),
    "odd columns: stride 2 vs unflatten": (lambda x: x[:, 1::2].exp(), lambda x: x.unflatten(-1, (3, 2))[..., 1].exp(),
                                           [_rn(3, 6)]),
    "strided rows from an offset": (lambda x: x[2::2].sin(), lambda x: x.view(3, 2, 4)[1:, 0].sin(), [_rn(6, 4)]),
    "einsum matrix product vs @": (lambda a, b: torch.einsum("ik,kj->ij", a, b), lambda a, b: a @ b,
                                   [_rn(5, 4), _rn(4, 3, seed=2)]),
    "batch-1 bmm vs mm": (lambda a, b: torch.bmm(a[None], b[None])[0], lambda a, b: torch.mm(a, b),
                          [_rn(5, 4), _rn(4, 3, seed=2)]),
    "x ** 2 vs x * x": (lambda x: (x ** 2).sum(-1), lambda x: (x * x).sum(-1), [_rn(3, 4)]),
    "square vs pow(2.0)": (lambda x: x.square(), lambda x: torch.pow(x, 2.0), [_rn(3, 4)]),
    "F.rms_norm vs written out": (lambda x, w: F.rms_norm(x, (4,), w, eps=1e-6),
                                  lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                                  [_rn(3, 4), _rn(4, seed=1)]),
    "sum over two dims vs view + sum": (lambda x: x.sum(dim=(1, 2)), lambda x: x.reshape(2, -1).sum(-1), [_rn(2, 3, 4)]),
    "sum of all vs nested sums": (lambda x: x.sum(), lambda x: x.sum(-1).sum(0), [_rn(3, 4)]),
    "mean vs sum / n": (lambda x: x.mean(-1), lambda x: x.sum(dim=1) / x.shape[1], [_rn(3, 4)]),
    "mean keepdim vs sum keepdim * (1/n)": (lambda x: torch.mean(x, -1, True), lambda x: x.sum(-1, keepdim=True) * 0.25,
                                            [_rn(3, 4)]),
}

DIFFERENT = {
    "softmax over another dim": (lambda x: torch.softmax(x, -1), lambda x: torch.softmax(x, 1), [_rn(2, 4, 4)]),
    "copy_ into part of a zero buffer": (lambda x: x * 2, lambda x: torch.zeros_like(x).index_copy(0, torch.tensor([0]), (x * 2)[:1]),
                                         [_rn(3, 4)]),
    "baddbmm with beta=1 on ones": (lambda a, b: torch.bmm(a, b),
                                    lambda a, b: torch.baddbmm(torch.ones(2, 5, 5, dtype=a.dtype), a, b, beta=1.0),
                                    [_rn(2, 5, 4), _rn(2, 4, 5, seed=2)]),
    "cumsum over another dim": (lambda x: x.cumsum(-1), lambda x: x.cumsum(0), [_rn(4, 4)]),
    "even vs odd columns": (lambda x: x[..., ::2] * 2, lambda x: x[..., 1::2] * 2, [_rn(3, 4)]),
    "stride 2 vs the first half": (lambda x: x[..., ::2] * 2, lambda x: x[..., :2] * 2, [_rn(3, 4)]),
    "sum over other dims": (lambda x: x.sum(dim=(1, 2)), lambda x: x.sum(dim=(0, 1)), [_rn(3, 3, 3)]),
    "mean vs sum": (lambda x: x.mean(-1), lambda x: x.sum(-1), [_rn(3, 4)]),
    "x ** 2 vs x ** 3": (lambda x: x ** 2, lambda x: x ** 3, [_rn(3, 4)]),
    "rms_norm with another eps": (lambda x, w: F.rms_norm(x, (4,), w, eps=1e-6),
                                  lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w,
                                  [_rn(3, 4), _rn(4, seed=1)]),
    "mean vs sum / (n - 1)": (lambda x: x.mean(-1), lambda x: x.sum(-1) / 3, [_rn(3, 5)]),
}


@pytest.mark.parametrize("name", sorted(SAME))
def test_two_spellings_are_one_value(name):
    seq, other, inputs = SAME[name]
    r = same(seq, other, inputs)
    assert r.status is gg.Status.PROVED, r


@pytest.mark.parametrize("name", sorted(DIFFERENT))
def test_a_different_computation_is_not_proved(name):
    seq, other, inputs = DIFFERENT[name]
    r = same(seq, other, inputs)
    assert r.status is gg.Status.REFUTED, r


LINEAR_SPELLINGS = {
    "F.linear": lambda x, w, b: F.linear(x, w, b),
    "matmul + bias": lambda x, w, b: x @ w.t() + b,
    "addmm on 2-D": lambda x, w, b: torch.addmm(b, x.flatten(0, 1), w.t()).unflatten(0, x.shape[:2]),
}


@pytest.mark.parametrize("rank_spelling", sorted(LINEAR_SPELLINGS))
@pytest.mark.parametrize("seq_spelling", sorted(LINEAR_SPELLINGS))
def test_column_parallel_linear_in_every_spelling(seq_spelling, rank_spelling):
    seq, rank = LINEAR_SPELLINGS[seq_spelling], LINEAR_SPELLINGS[rank_spelling]
    ins = [_rn(2, 5, 4), _rn(6, 4, seed=1), _rn(6, seed=2)]
    r = gg.verify(gg.Problem(seq, rank, ins, [R, gg.Shard(0), gg.Shard(0)], 2, expect=[gg.Shard(-1)]))
    assert r.status is gg.Status.PROVED, r
    # the bias added twice on the ranks is a bug in every spelling
    r = gg.verify(gg.Problem(seq, lambda x, w, b: rank(x, w, b) + b, ins, [R, gg.Shard(0), gg.Shard(0)], 2,
                             expect=[gg.Shard(-1)]))
    assert r.status is gg.Status.REFUTED, r


def test_dead_code_is_not_a_step():
    def seq(x):
        unused = torch.exp(x).cumsum(0)  # noqa: F841 - dead: no output depends on it
        return x * 3

    r = same(seq, lambda x: x * 3, [_rn(3, 4)])
    assert r.status is gg.Status.PROVED, r


@pytest.mark.parametrize("op", sorted(DIM_OF_SELF, key=str), ids=str)
def test_dim_normalization_lists_only_ops_whose_dims_index_their_first_tensor(op):
    """Every listed overload has a ``dim``/``dims`` argument (so the list has no typo'd entries)."""
    names = {a.name for a in op._schema.arguments}
    assert names & {"dim", "dims"}, f"{op} has no dim argument"


@pytest.mark.parametrize("fn", [
    lambda x: torch.softmax(x, -2), lambda x: x.cumsum(-1), lambda x: x.flip((-1, -3)), lambda x: x.roll(1, -2),
    lambda x: x.argmax(-1), lambda x: x.sort(-2).values, lambda x: x.topk(2, -1).indices,
    lambda x: x.var(-1, correction=0), lambda x: F.glu(x, -1),
    lambda x: x.index_select(-1, torch.tensor([1, 0])), lambda x: x.logcumsumexp(-3),
    lambda x: x ** 2, lambda x: x.square() + x.pow(2.0), lambda x: torch.ops.aten.add.Scalar(x, 1e-6),
    lambda x: torch.ops.aten.div.Scalar(x, 3), lambda x: torch.ops.aten.mul.Scalar(x, 0.1),
    lambda x: x[..., 1::2], lambda x: x[:, ::3], lambda x: x[1::2, ::2],
    lambda x: F.rms_norm(x, (4,), eps=1e-6),
])
def test_normalized_calls_compute_the_same_values(fn):
    x = _rn(2, 3, 4)
    from torch.fx.experimental.proxy_tensor import make_fx

    g = lower(make_fx(fn)(x))
    env = {}
    for n in g.nodes:
        env[n.name] = x if n.op == "input" else _apply(n, env)
    want = fn(x)
    got = env[g.outputs[0].name]
    assert torch.equal(got, want)


def _apply(n, env):
    from gg_notebook.relations.expr import apply_op

    return apply_op(n.op, n.attrs, [env[i.name] for i in n.inputs])


NEUTRAL = {"plus zero": lambda y: y + 0.0, "minus int zero": lambda y: y - 0, "times one": lambda y: y * 1.0,
           "divided by one": lambda y: torch.div(y, 1), "add with alpha, zero": lambda y: y.add(0.0, alpha=5)}


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_neutral_scalars_before_a_reduction(name):
    """``y + 0``, ``y * 1``... on a partial sum are ``y`` itself (so they commute with the all-reduce);
    a non-neutral scalar there is the classic bias-before-reduce bug."""
    import torch.distributed as dist

    def rank(op):
        def fn(x, w):
            y = op(x @ w)
            dist.all_reduce(y)
            return y
        return fn

    ins = [_rn(4, 8), _rn(8, 6, seed=1)]
    ok = gg.verify(gg.Problem(lambda x, w: x @ w, rank(NEUTRAL[name]), ins, [gg.Shard(1), gg.Shard(0)], 2, expect=[R]))
    assert ok.status is gg.Status.PROVED, ok
    bad = gg.verify(gg.Problem(lambda x, w: x @ w, rank(lambda y: y * 0.0), ins, [gg.Shard(1), gg.Shard(0)], 2,
                               expect=[R]))
    assert bad.status is gg.Status.REFUTED, bad


# ------------------------------------------------------------------ weight[ids] vs F.embedding
_W = _rn(10, 4, seed=5)
_IDS = torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(6))


def _index_problem(seq, other, domains=None):
    return gg.Problem(seq, other, [_W, _IDS], [R, R], 2, expect=[R], domains=domains or {})


@pytest.mark.parametrize("seq,other", [
    (lambda w, i: w[i.clamp(0, 9)], lambda w, i: F.embedding(i.clamp(0, 9), w)),
    (lambda w, i: w[i % 10], lambda w, i: F.embedding(torch.remainder(i, 10), w)),
    (lambda w, i: w[torch.arange(4)] + i.sum(), lambda w, i: F.embedding(torch.arange(4), w) + i.sum()),
    (lambda w, i: w[torch.where(i > 4, i.clamp(0, 9), 0)], lambda w, i: F.embedding(torch.where(i > 4, i.clamp(0, 9), 0), w)),
], ids=["clamp", "remainder", "arange", "where with zero"])
def test_row_lookup_by_ids_in_range_is_an_embedding(seq, other):
    assert gg.verify(_index_problem(seq, other)).status is gg.Status.PROVED


def test_row_lookup_with_unbounded_ids_is_not_an_embedding():
    def seq(w, i):
        return w[(i - 3).clamp(min=0)]  # no upper bound: an id past V fails here ...

    def emb(w, i):
        return F.embedding((i - 3).clamp(0, 9), w)  # ... and is clamped there

    assert gg.verify(_index_problem(seq, emb)).status is not gg.Status.PROVED


def test_row_lookup_is_an_embedding_when_the_ids_domain_is_declared():
    def seq(w, i):
        return w[i]

    def emb(w, i):
        return F.embedding(i, w)

    assert gg.verify(_index_problem(seq, emb, {"i": range(0, 10)})).status is gg.Status.PROVED
    # without the declaration a negative id wraps in w[i] and fails in F.embedding: not one value
    assert gg.verify(_index_problem(seq, emb)).status is not gg.Status.PROVED
    # a domain with negative ids is not enough either
    assert gg.verify(_index_problem(seq, emb, {"i": range(-10, 10)})).status is not gg.Status.PROVED


def test_gradient_of_a_row_lookup_is_the_embedding_gradient():
    def seq(w, i):
        (g,) = torch.autograd.grad((w[i] ** 2).sum(), w)
        return g

    def emb(w, i):
        (g,) = torch.autograd.grad((F.embedding(i, w) ** 2).sum(), w)
        return g

    w = _W.clone().requires_grad_()
    p = gg.Problem(seq, emb, [w, _IDS], [R, R], 2, expect=[R], domains={"i": range(0, 10)})
    assert gg.verify(p).status is gg.Status.PROVED


def test_integer_ranges():
    from torch.fx.experimental.proxy_tensor import make_fx

    from gg_notebook.ir.ranges import IntRanges

    def f(i):
        return (i.clamp(0, 9), i - 3, torch.arange(2, 8), torch.where(i > 0, i, -1), i.remainder(5),
                (i.clamp(0, 9) - 3).clamp(min=0), i.clamp(max=4), i.masked_fill(i > 3, 7))

    g = lower(make_fx(f)(_IDS))
    ranges = IntRanges({0: (0, 9)})
    got = [ranges.of(o) for o in g.outputs]
    assert got == [(0, 9), (-3, 6), (2, 7), (-1, 9), (0, 4), (0, 6), (0, 4), (0, 9)]
    assert [IntRanges().of(o) for o in g.outputs][:2] == [(0, 9), None]  # unknown input: only clamp bounds


# ---------------------------------------- all-gather into a preallocated buffer's pieces (views)


def _gathered_mlp(x, w1, w2):
    return torch.relu(x @ w1.t()) @ w2.t()


def _gather_chunks(p):
    buf = torch.empty(p.shape[0] * dist.get_world_size(), *p.shape[1:], dtype=p.dtype)
    dist.all_gather(list(buf.chunk(dist.get_world_size())), p)
    return buf


def _gather_slices(p):
    n, W = p.shape[0], dist.get_world_size()
    buf = p.new_empty((n * W, *p.shape[1:]))
    dist.all_gather([buf[i * n:(i + 1) * n] for i in range(W)], p.contiguous())
    return buf


def _gather_split(p):
    buf = torch.empty((dist.get_world_size(), *p.shape), dtype=p.dtype)
    dist.all_gather(list(buf.unbind(0)), p)
    return buf.flatten(0, 1)


def _gather_reversed_chunks(p):  # BUG: the chunks are filled in reverse rank order
    buf = torch.empty(p.shape[0] * dist.get_world_size(), *p.shape[1:], dtype=p.dtype)
    dist.all_gather(list(reversed(buf.chunk(dist.get_world_size()))), p)
    return buf


@pytest.mark.parametrize("gather", [_gather_chunks, _gather_slices, _gather_split, _gather_reversed_chunks])
@pytest.mark.parametrize("world_size", [2, 4])
def test_all_gather_into_buffer_views(gather, world_size):
    def rank_fn(x, w1, w2):
        return _gathered_mlp(x, gather(w1), gather(w2))

    p = gg.Problem(sequential=_gathered_mlp, distributed=rank_fn,
                   inputs=[_rn(3, 8, seed=1), _rn(8, 8, seed=2), _rn(4, 8, seed=3)],
                   placements=[gg.Replicate(), gg.Shard(0), gg.Shard(0)], world_size=world_size,
                   expect=[gg.Replicate()])
    r = gg.verify(p)
    if gather is _gather_reversed_chunks:
        assert r.status is gg.Status.REFUTED and r.counterexample is not None
    else:
        assert r.status is gg.Status.PROVED, r
