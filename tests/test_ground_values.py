"""Input-independent values compared by value (issue #8, item 2).

Position ids, causal masks and rotary tables do not depend on a problem's inputs. A sequence-
parallel rank computes *its* rows of them (positions ``r*n .. (r+1)*n``), spelled differently from
the sequential program's whole table: ``arange(4, 8)`` vs ``arange(8)[4:8]`` vs ``arange(4) + 4``.
These tests write such programs as users do, in several spellings, and check that every correct one
is proved (through `gg_notebook.relations.ground`: ground terms interned by dtype, shape and bytes,
and tiled across the ranks by value), that the realistic bugs next to them are refuted at the line
that consumes the wrong values, and that values equal only up to rounding or dtype are not merged.
"""

from __future__ import annotations

import inspect
import math
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.concrete.certificate import make_certificate
from gg_notebook.engine.index import DVal
from gg_notebook.ir.lower import _Full
from gg_notebook.relations import ground
from gg_notebook.relations.expr import ExprStore, OpSpec, Slot, evaluate

aten = torch.ops.aten
W = 2


def _rn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _line(fn, marker: str) -> str:
    """``file:line`` (file name only) of the line of ``fn`` that carries ``# <marker>``."""
    lines, first = inspect.getsourcelines(fn)
    hits = [first + i for i, text in enumerate(lines) if f"# {marker}" in text]
    assert len(hits) == 1, (fn, marker)
    return f"{inspect.getsourcefile(fn).rsplit('/', 1)[-1]}:{hits[0]}"


def _verify(seq, rank, inputs, placements, expect):
    return gg.verify(gg.Problem(seq, rank, inputs, placements, W, expect=expect))


def _proved(r):
    assert r.status is gg.Status.PROVED, r
    assert r.stats.get("validated") is True, r.stats  # translation validation re-evaluated every relation


def _refuted_at(r, fn, marker):
    assert r.status is gg.Status.REFUTED, r
    assert r.culprit is not None and r.culprit.source is not None, r
    assert r.culprit.source.rsplit("/", 1)[-1] == _line(fn, marker), (r.culprit, _line(fn, marker))


def _gather_rows(t):
    out = torch.empty((t.shape[0] * dist.get_world_size(), *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous())
    return out


# ============================================================================ unit: canonicalization
def _const(target, *args, **kwargs):
    return OpSpec("const", str(target), target, (args, tuple(sorted(kwargs.items()))))


def _call(target, *args, kind="generic", **kwargs):
    return OpSpec(kind, str(target), target, (args, tuple(sorted(kwargs.items()))))


def _arange(S, *args, dtype=torch.int64):
    t = torch.arange(*args, dtype=dtype)
    target = aten.arange.start_step if len(args) == 3 else aten.arange.start if len(args) == 2 else aten.arange.default
    return S.const(_const(target, *args, dtype=dtype), tuple(t.shape), dtype)


def test_one_value_one_node_whatever_the_spelling():
    S = ExprStore()
    a = _arange(S, 4, 8)
    b = S.slice(_arange(S, 8), 0, 4, 8)
    c = S.call(_call(aten.add.Tensor, Slot(0), 4, kind="ew"), [_arange(S, 4)])
    d = S.view(S.slice(S.view(_arange(S, 0, 16, 2), (2, 4)), 0, 1, 2), (4,))  # [8, 10, 12, 14] / 2
    d = S.call(_call(aten.div.Tensor_mode, Slot(0), 2, rounding_mode="floor", kind="ew"), [d])
    assert a is b is c is d
    assert a.op == "const" and ground.is_value(a) and a.ground and not a.args
    assert torch.equal(ground.value_of(a), torch.arange(4, 8))
    assert "arange(4, 8)" in a.attrs.name


def test_dtype_is_part_of_the_value():
    S = ExprStore()
    f32, f64 = _arange(S, 8, dtype=torch.float32), _arange(S, 8, dtype=torch.float64)
    assert f32 is not f64 and f32.dtype == torch.float32 and f64.dtype == torch.float64
    # the same numbers after a cast are the float64 value
    cast = S.call(_call(aten._to_copy.default, Slot(0), dtype=torch.float64, kind="ew"), [f32])
    assert cast is f64
    i64 = _arange(S, 8)
    assert i64 is not f32 and i64 is not f64


def test_floats_compare_bitwise():
    S = ExprStore()

    def full(v, dtype=torch.float32):
        return S.const(OpSpec("const", f"full({v})", _Full.of((3,), v, dtype), ((), ())), (3,), dtype)

    assert full(0.0) is not full(-0.0)  # different bits: -0.0 is not merged with 0.0
    assert full(float("nan")) is full(float("nan"))  # the same NaN bits are the same value
    nan_other = S.call(_call(aten.sqrt.default, Slot(0), kind="ew"), [full(-1.0)])  # another NaN payload?
    want = torch.sqrt(torch.full((3,), -1.0))
    same_bits = torch.equal(want.view(torch.int32), torch.full((3,), float("nan")).view(torch.int32))
    assert (nan_other is full(float("nan"))) == same_bits
    # a value and its rounding are different values
    third = S.call(_call(aten.div.Tensor, Slot(0), 3.0, kind="ew"), [full(1.0)])
    approx = full(0.3333333)
    assert third is not approx


def test_random_and_structural_terms_are_kept_by_spelling(monkeypatch):
    S = ExprStore()
    rand = OpSpec("generic", "aten.rand.default", aten.rand.default, (((4,),), ()), unique="0:rand")
    r1 = S.call(rand, [], (4,), torch.float32)
    assert r1.op == "call" and not ground.is_value(r1)
    # anything computed from a random value stays structural too
    doubled = S.call(_call(aten.mul.Tensor, Slot(0), 2.0, kind="ew"), [r1])
    assert doubled.op == "call"

    # as_strided reads the argument's memory layout, which a value node does not keep
    strided = S.call(_call(aten.as_strided.default, Slot(0), (2, 2), (1, 2)), [_arange(S, 4)])
    assert strided.op == "call"

    # too large: never evaluated (the factory would raise if it ran)
    def boom(*a, **k):
        raise AssertionError("a value over the size cap was evaluated")

    monkeypatch.setattr(ground, "MAX_ELEMENTS", 100)
    big = S.const(OpSpec("const", "boom", boom, ((), ())), (1000, 1000), torch.float32)
    assert big.op == "const" and not ground.is_value(big)
    small = S.slice(big, 0, 0, 1)  # a slice of a structural value is structural
    assert small.op == "slice"


def test_in_place_operators_do_not_write_stored_values():
    S = ExprStore()
    pos = _arange(S, 4)
    bumped = S.call(_call(aten.add_.Tensor, Slot(0), 10, kind="ew"), [pos])
    assert torch.equal(ground.value_of(bumped), torch.arange(10, 14))
    assert torch.equal(ground.value_of(pos), torch.arange(4)) and _arange(S, 4) is pos


def test_float_all_reduce_stays_structural_int_all_reduce_is_a_value():
    S = ExprStore()
    f = [_arange(S, 4, dtype=torch.float32), _arange(S, 1, 5, dtype=torch.float32)]
    assert S.accum("sum", f).op == "accum"  # a real all-reduce rounds in its own order
    i = [_arange(S, 4), _arange(S, 1, 5)]
    total = S.accum("sum", i)
    assert ground.is_value(total) and torch.equal(ground.value_of(total), torch.tensor([1, 3, 5, 7]))


def test_values_evaluate_and_pickle():
    S = ExprStore()
    v = S.slice(_arange(S, 10), 0, 2, 5)
    got = evaluate(v, lambda e: None)
    assert torch.equal(got, torch.tensor([2, 3, 4]))
    got.fill_(0)  # the caller's copy: the stored value is untouched
    assert torch.equal(evaluate(v, lambda e: None), torch.tensor([2, 3, 4]))
    back = pickle.loads(pickle.dumps(v.attrs))
    assert back == v.attrs and hash(back) == hash(v.attrs)


def test_factories_on_another_device_are_evaluated_on_cpu():
    S = ExprStore()
    meta = S.const(_const(aten.arange.start, 0, 4, dtype=torch.int64, device=torch.device("meta")), (4,), torch.int64)
    assert meta is _arange(S, 0, 4)


def test_value_tiling_finds_the_rows_each_rank_holds():
    S = ExprStore()
    whole = _arange(S, 8)
    mask = S.call(_call(aten.triu.default, Slot(0), 1), [
        S.const(OpSpec("const", "ones", _Full.of((8, 8), True, torch.bool), ((), ())), (8, 8), torch.bool)])
    rows = [S.slice(mask, 0, 0, 4), S.slice(mask, 0, 4, 8)]

    def index(*terms):
        return SimpleNamespace(dvals=[DVal(i, t) for i, t in enumerate(terms)])

    idx = index(_arange(S, 4, 8), _arange(S, 0, 4), *rows)
    [(dim, pieces)] = ground.value_tiling(idx, whole)
    assert dim == 0 and [p.id for p in pieces] == [1, 0]
    [(dim, pieces)] = ground.value_tiling(idx, mask)
    assert dim == 0 and [p.id for p in pieces] == [2, 3]
    # every rank holding the first positions does not tile the positions
    assert ground.value_tiling(index(_arange(S, 0, 4)), whole) == []
    # a uniform value is tiled only by copies of one held piece of the same constant that divides it
    # (the ones a sum's backward seeds, split by the ranks)
    sevens = S.const(OpSpec("const", "s", _Full.of((8,), 7, torch.int64), ((), ())), (8,), torch.int64)
    held = S.slice(sevens, 0, 0, 4)
    [(dim, pieces)] = ground.value_tiling(index(held), sevens)
    assert dim == 0 and [p.term.id for p in pieces] == [held.id, held.id]
    assert ground.value_tiling(index(S.slice(sevens, 0, 0, 3)), sevens) == []      # 3 does not divide 8
    ones = S.const(OpSpec("const", "o", _Full.of((4,), 1, torch.int64), ((), ())), (4,), torch.int64)
    assert ground.value_tiling(index(ones), sevens) == []                            # another constant
    # zeros are never tiled: they stay a constant, so that x + 0 is x in the term store
    zeros = S.const(OpSpec("const", "z", _Full.of((8,), 0, torch.int64), ((), ())), (8,), torch.int64)
    assert ground.value_tiling(index(S.slice(zeros, 0, 0, 4)), zeros) == []


# ============================================================ programs: positions and learned position embeddings
S_LEN, D = 8, 4

# how a rank computes its positions r*n .. (r+1)*n (n: its sequence shard, W ranks)
POSITIONS = {
    "arange(r*n, (r+1)*n)": lambda r, n, W: torch.arange(r * n, (r + 1) * n),
    "arange(n, dtype=long) + r*n": lambda r, n, W: torch.arange(n, dtype=torch.long) + r * n,
    "arange(W*n)[r*n:(r+1)*n]": lambda r, n, W: torch.arange(W * n)[r * n:(r + 1) * n],
    "arange(W*n).chunk(W)[r]": lambda r, n, W: torch.arange(W * n).chunk(W)[r],
}


def seq_embedding(x, wpe):  # x: [seq, hidden]
    pos = torch.arange(x.shape[0])
    return x + F.embedding(pos, wpe)  # gg: lookup


def seq_index(x, wpe):
    pos = torch.arange(0, x.shape[0], dtype=torch.long)
    return x + wpe[pos]  # gg: lookup


def seq_gpt2(x, wpe):  # GPT-2: pos = arange(0, t, dtype=long).unsqueeze(0), a batch dim in front
    t = x.shape[0]
    pos = torch.arange(0, t, dtype=torch.long, device=x.device).unsqueeze(0)  # [1, t]
    return (x.unsqueeze(0) + F.embedding(pos, wpe)).squeeze(0)  # gg: lookup


def rank_program(lookup: str, positions):
    """One rank of ``lookup``'s program, with its positions computed by ``positions``."""

    def rank(x, wpe):
        r, n, w = dist.get_rank(), x.shape[0], dist.get_world_size()
        pos = positions(r, n, w)
        if lookup == "F.embedding":
            return x + F.embedding(pos, wpe)
        if lookup == "wpe[pos]":
            return x + wpe[pos]
        return (x.unsqueeze(0) + F.embedding(pos.unsqueeze(0), wpe)).squeeze(0)

    return rank


LOOKUPS = {"F.embedding": seq_embedding, "wpe[pos]": seq_index, "GPT-2 arange(0, t, dtype=long)": seq_gpt2}
POS_CASES = [(lk, ps) for lk in sorted(LOOKUPS) for ps in sorted(POSITIONS)]


def _pos_inputs():
    return [_rn(S_LEN, D), _rn(S_LEN, D, seed=1)]


@pytest.mark.parametrize("lookup,positions", POS_CASES)
def test_sequence_parallel_position_embedding(lookup, positions):
    r = _verify(LOOKUPS[lookup], rank_program(lookup, POSITIONS[positions]), _pos_inputs(),
                [gg.Shard(0), gg.Replicate()], [gg.Shard(0)])
    _proved(r)


@pytest.mark.parametrize("lookup", sorted(LOOKUPS))
def test_every_rank_using_positions_from_zero_is_refuted_at_the_lookup(lookup):
    seq = LOOKUPS[lookup]
    bug = rank_program(lookup, lambda r, n, W: torch.arange(n))  # every rank: positions 0..n
    r = _verify(seq, bug, _pos_inputs(), [gg.Shard(0), gg.Replicate()], [gg.Shard(0)])
    _refuted_at(r, seq, "gg: lookup")


def test_position_embedding_certificate_checks():
    problem = gg.Problem(seq_embedding, rank_program("F.embedding", POSITIONS["arange(n, dtype=long) + r*n"]),
                         _pos_inputs(), [gg.Shard(0), gg.Replicate()], W, expect=[gg.Shard(0)])
    r = gg.verify(problem)
    _proved(r)
    check = gg.check_certificate(problem, make_certificate(r))
    assert check.ok, check


# ============================================================ programs: causal masks for a sequence shard
def seq_causal_triu(q, k, v):  # q, k, v: [seq, head_dim]
    s = q.shape[0]
    scores = q @ k.t() / math.sqrt(q.shape[-1])
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v  # gg: masked


def seq_causal_positions(q, k, v):
    s = q.shape[0]
    pos = torch.arange(s)
    scores = torch.matmul(q, k.transpose(0, 1)) / math.sqrt(q.shape[-1])
    allowed = pos[:, None] >= pos[None, :]
    return torch.matmul(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1), v)  # gg: masked


def rank_mask_rows_of_full(q, k, v):  # query rows of this rank vs all keys, the full mask sliced
    r, n = dist.get_rank(), q.shape[0]
    K, V = _gather_rows(k), _gather_rows(v)
    s = K.shape[0]
    scores = q @ K.t() / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[r * n:(r + 1) * n]
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ V


def rank_mask_from_positions(q, k, v):
    r, n = dist.get_rank(), q.shape[0]
    K, V = _gather_rows(k), _gather_rows(v)
    q_pos, k_pos = torch.arange(r * n, (r + 1) * n), torch.arange(K.shape[0])
    scores = q @ K.t() / math.sqrt(q.shape[-1])
    allowed = q_pos.unsqueeze(1) >= k_pos.unsqueeze(0)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ V


def rank_mask_triu_diagonal(q, k, v):
    r, n = dist.get_rank(), q.shape[0]
    K, V = _gather_rows(k), _gather_rows(v)
    scores = q @ K.t() / math.sqrt(q.shape[-1])
    mask = torch.triu(torch.ones(n, K.shape[0], dtype=torch.bool), diagonal=1 + r * n)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ V


def rank_mask_first_rows_bug(q, k, v):  # every rank masks as if it held the first queries
    n = q.shape[0]
    K, V = _gather_rows(k), _gather_rows(v)
    s = K.shape[0]
    scores = q @ K.t() / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[:n]
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ V


def seq_causal_bias(q, k, v):  # an additive mask: -inf above the diagonal, 0 elsewhere
    s = q.shape[0]
    scores = q @ k.t() / math.sqrt(q.shape[-1])
    bias = torch.full((s, s), float("-inf"), dtype=q.dtype).triu(1)
    return torch.softmax(scores + bias, dim=-1) @ v  # gg: masked


def rank_bias_triu_diagonal(q, k, v):
    r, n = dist.get_rank(), q.shape[0]
    K, V = _gather_rows(k), _gather_rows(v)
    scores = q @ K.t() / math.sqrt(q.shape[-1])
    bias = torch.full((n, K.shape[0]), float("-inf"), dtype=q.dtype).triu(1 + r * n)
    return torch.softmax(scores + bias, dim=-1) @ V


def rank_bias_rows_of_full(q, k, v):
    r, n = dist.get_rank(), q.shape[0]
    K, V = _gather_rows(k), _gather_rows(v)
    s = K.shape[0]
    scores = q @ K.t() / math.sqrt(q.shape[-1])
    bias = torch.full((s, s), float("-inf"), dtype=q.dtype).triu(1).narrow(0, r * n, n)
    return torch.softmax(scores + bias, dim=-1) @ V


def rank_bias_masked_zeros(q, k, v):
    r, n = dist.get_rank(), q.shape[0]
    K, V = _gather_rows(k), _gather_rows(v)
    q_pos, k_pos = torch.arange(r * n, (r + 1) * n), torch.arange(K.shape[0])
    scores = q @ K.t() / math.sqrt(q.shape[-1])
    bias = torch.zeros(n, K.shape[0], dtype=q.dtype).masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(scores + bias, dim=-1) @ V


def rank_bias_first_rows_bug(q, k, v):
    n = q.shape[0]
    K, V = _gather_rows(k), _gather_rows(v)
    scores = q @ K.t() / math.sqrt(q.shape[-1])
    bias = torch.full((n, K.shape[0]), float("-inf"), dtype=q.dtype).triu(1)
    return torch.softmax(scores + bias, dim=-1) @ V


MASK_FAMILIES = {
    # (sequential spellings, rank spellings, the bug): boolean masks and additive masks
    "bool": ({"triu(ones)": seq_causal_triu, "pos[:, None] >= pos[None, :]": seq_causal_positions},
             {"rows of the full mask": rank_mask_rows_of_full, "from positions": rank_mask_from_positions,
              "triu(diagonal=1 + r*n)": rank_mask_triu_diagonal}, rank_mask_first_rows_bug),
    "additive": ({"full(-inf).triu(1)": seq_causal_bias},
                 {"full(-inf).triu(1 + r*n)": rank_bias_triu_diagonal, "rows of the full bias": rank_bias_rows_of_full,
                  "zeros.masked_fill(k > q, -inf)": rank_bias_masked_zeros}, rank_bias_first_rows_bug),
}
MASK_CASES = [(fam, s, r) for fam, (seqs, ranks, _) in MASK_FAMILIES.items() for s in seqs for r in ranks]


def _qkv():
    return [_rn(S_LEN, D), _rn(S_LEN, D, seed=1), _rn(S_LEN, D, seed=2)]


@pytest.mark.parametrize("family,seq_name,rank_name", MASK_CASES)
def test_causal_mask_of_a_sequence_shard(family, seq_name, rank_name):
    seqs, ranks, _ = MASK_FAMILIES[family]
    r = _verify(seqs[seq_name], ranks[rank_name], _qkv(), [gg.Shard(0)] * 3, [gg.Shard(0)])
    _proved(r)


@pytest.mark.parametrize("family,seq_name", [(fam, s) for fam, (seqs, _, _) in MASK_FAMILIES.items() for s in seqs])
def test_a_mask_for_the_wrong_rows_is_refuted_where_it_is_applied(family, seq_name):
    seqs, _, bug = MASK_FAMILIES[family]
    r = _verify(seqs[seq_name], bug, _qkv(), [gg.Shard(0)] * 3, [gg.Shard(0)])
    _refuted_at(r, seqs[seq_name], "gg: masked")


# ============================================================ programs: rotary tables
def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_table(positions, dim, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def seq_rope(q):  # q: [seq, heads, head_dim]
    cos, sin = rope_table(torch.arange(q.shape[0]), q.shape[-1])
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin  # gg: rope


def rank_rope_own_positions(q):
    r, n = dist.get_rank(), q.shape[0]
    cos, sin = rope_table(torch.arange(r * n, (r + 1) * n), q.shape[-1])
    return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)


def rank_rope_rows_of_table(q):
    r, n = dist.get_rank(), q.shape[0]
    cos, sin = rope_table(torch.arange(n * dist.get_world_size()), q.shape[-1])
    cos, sin = cos[r * n:(r + 1) * n], sin[r * n:(r + 1) * n]
    return q * cos[:, None, :] + rotate_half(q) * sin[:, None, :]


def rank_rope_float_positions(q):
    r, n = dist.get_rank(), q.shape[0]
    t = torch.arange(n, dtype=torch.float32) + r * n  # float positions, shifted (exact for small ints)
    cos, sin = rope_table(t, q.shape[-1])
    return q * cos[:, None] + rotate_half(q) * sin[:, None]


def rank_rope_positions_bug(q):  # every rank rotates as if it held the first positions
    n = q.shape[0]
    cos, sin = rope_table(torch.arange(n), q.shape[-1])
    return q * cos[:, None, :] + rotate_half(q) * sin[:, None, :]


ROPE_RANK = {"own positions": rank_rope_own_positions, "rows of the whole table": rank_rope_rows_of_table,
             "float positions arange(n) + r*n": rank_rope_float_positions}


def _q():
    return [_rn(S_LEN, 2, 8, dtype=torch.float32)]


@pytest.mark.parametrize("rank_name", sorted(ROPE_RANK))
def test_rope_tables_per_rank(rank_name):
    r = _verify(seq_rope, ROPE_RANK[rank_name], _q(), [gg.Shard(0)], [gg.Shard(0)])
    _proved(r)


def test_rope_with_the_wrong_positions_is_refuted_where_it_is_applied():
    r = _verify(seq_rope, rank_rope_positions_bug, _q(), [gg.Shard(0)], [gg.Shard(0)])
    _refuted_at(r, seq_rope, "gg: rope")


def polar_table(positions, dim, base=10000.0):
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(positions.float(), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)  # complex64 [seq, dim/2]
    return torch.view_as_real(cis).flatten(-2)  # [seq, dim]: cos, sin interleaved


def seq_polar(x):
    return x * polar_table(torch.arange(x.shape[0]), x.shape[-1])


def rank_polar(x):
    r, n = dist.get_rank(), x.shape[0]
    return x * polar_table(torch.arange(r * n, (r + 1) * n), x.shape[-1])


def test_polar_tables_are_compared_by_value():
    r = _verify(seq_polar, rank_polar, [_rn(S_LEN, 8, dtype=torch.float32)], [gg.Shard(0)], [gg.Shard(0)])
    _proved(r)


def seq_complex_rope(q):
    qc = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2))
    angles = torch.outer(torch.arange(q.shape[0]).float(), 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8)))
    return torch.view_as_real(qc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def rank_complex_rope(q):
    r, n = dist.get_rank(), q.shape[0]
    qc = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2))
    angles = torch.outer(torch.arange(r * n, (r + 1) * n).float(), 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8)))
    return torch.view_as_real(qc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def test_complex_rope_on_a_sequence_shard():
    r = _verify(seq_complex_rope, rank_complex_rope, [_rn(S_LEN, 8, dtype=torch.float32)], [gg.Shard(0)], [gg.Shard(0)])
    _proved(r)


# ============================================================ honest limits: rounding and dtype
def _inv_freq_reciprocal(dim, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


def _inv_freq_exp(dim, base=10000.0):
    return torch.exp(torch.arange(0, dim, 2).float() * (-math.log(base) / dim))


def seq_inv_freq(x):
    return x * torch.outer(torch.arange(x.shape[0]).float(), _inv_freq_reciprocal(x.shape[-1] * 2))


def rank_inv_freq_exp(x):  # the same table, mathematically, computed in another order
    r, n = dist.get_rank(), x.shape[0]
    return x * torch.outer(torch.arange(r * n, (r + 1) * n).float(), _inv_freq_exp(x.shape[-1] * 2))


def test_a_table_computed_in_another_order_is_another_value():
    """``exp(-k log b / d)`` and ``1 / b ** (k / d)`` agree to rounding, not bit for bit. Values are
    merged only when their bits are equal, so this is not proved (no tolerance is sound for every
    later use of the table); the numbers agree, so it is not refuted either: unknown."""
    a, b = _inv_freq_reciprocal(8), _inv_freq_exp(8)
    assert torch.allclose(a, b) and not torch.equal(a, b)  # the premise: equal up to rounding only
    r = _verify(seq_inv_freq, rank_inv_freq_exp, [_rn(S_LEN, 4, dtype=torch.float32)], [gg.Shard(0)], [gg.Shard(0)])
    assert r.status is gg.Status.UNKNOWN, r
    assert any(f.kind == "numbers-agree" for f in r.findings), r.findings


def seq_scaled_positions(x):
    return x + torch.arange(x.shape[0], dtype=torch.float64)[:, None] / 10  # gg: add


def rank_scaled_positions_float32(x):  # float32 positions: 0.1 * k rounds differently
    r, n = dist.get_rank(), x.shape[0]
    return x + torch.arange(r * n, (r + 1) * n, dtype=torch.float32)[:, None] / 10


def rank_scaled_positions_float64(x):
    r, n = dist.get_rank(), x.shape[0]
    return x + torch.arange(r * n, (r + 1) * n, dtype=torch.float64)[:, None] / 10


def test_float32_positions_are_not_the_float64_positions():
    ins = [_rn(S_LEN, 3)]
    r = _verify(seq_scaled_positions, rank_scaled_positions_float32, ins, [gg.Shard(0)], [gg.Shard(0)])
    assert r.status is not gg.Status.PROVED, r
    _proved(_verify(seq_scaled_positions, rank_scaled_positions_float64, ins, [gg.Shard(0)], [gg.Shard(0)]))
