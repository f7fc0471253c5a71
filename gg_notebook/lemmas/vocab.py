"""Vocabulary parallelism: an embedding table split by rows (Megatron's VocabParallelEmbedding).

``vocab-embedding``: ``embedding(concat(w_0..w_n, dim=0), ids) = sum_k masked_lookup_k(w_k, ids)``
where ``masked_lookup_k`` looks up ``ids - start_k`` in shard k for ids inside ``[start_k, end_k)``
and gives zero rows elsewhere. The identity itself is checked numerically like any lemma; the
*matcher* for ``masked_lookup`` then relates each piece to what a rank computes: an
``embedding(w_k, J)`` optionally followed by zeroing rows under a mask ``M`` (``x[M] = 0``,
``masked_fill``), accepted only if, for every id v in ``[0, V)``, ``M(v)`` holds exactly outside the
shard's range and ``J(v) = v - start_k`` inside it (see domain.py: an exhaustive check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register, register_matcher
from gg_notebook.lemmas.domain import eval_on_domain
from gg_notebook.relations.expr import Expr, ExprStore, OpSpec, Slot


@dataclass(frozen=True)
class MaskedLookup:
    """Rows ``weight[ids - start]`` for ids in ``[start, start + len(weight))``, zero elsewhere."""

    start: int

    def __call__(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        valid = (local >= 0) & (local < weight.shape[0])
        out = F.embedding(local.clamp(0, max(weight.shape[0] - 1, 0)), weight)
        return out * valid.unsqueeze(-1).to(out.dtype)


def masked_lookup_spec(start: int, vocab: int) -> OpSpec:
    return OpSpec("masked_lookup", f"masked_lookup[{start}:]", MaskedLookup(start), ((Slot(0), Slot(1)), ()),
                  (("start", start), ("vocab", vocab)))


def vocab_embedding(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    w, ids = args[0], args[1]
    if w.op != "cat" or w.attrs != 0 or ids.dtype not in (torch.int64, torch.int32):
        return
    vocab = w.shape[0]
    pieces, off = [], 0
    for part in w.args:
        pieces.append(S.call(masked_lookup_spec(off, vocab), [part, ids]))
        off += part.shape[0]
    yield S.accum("sum", pieces)


def _zeroing_mask(e: Expr, x: Expr, row_shape: tuple | None = None) -> Expr | None:
    """If ``e`` zeroes entries of ``x`` under a mask of ``row_shape`` (default: rows, ``x.shape[:-1]``)
    via ``x[M] = 0`` or ``x.masked_fill(M, 0)``, that mask."""
    if e.op != "call" or not e.args or e.args[0].id != x.id:
        return None
    name = e.attrs.name
    row_shape = tuple(x.shape[:-1]) if row_shape is None else tuple(row_shape)
    if name in ("aten.index_put.default", "aten.index_put_.default") and len(e.args) == 3:
        mask, value = e.args[1], e.args[2]
        if value.op == "const" and bool((value.attrs.call([]) == 0).all()) and tuple(mask.shape) == row_shape:
            return mask
    if name in ("aten.masked_fill.Scalar", "aten.masked_fill.Tensor") and len(e.args) >= 2:
        args, _ = e.attrs.template
        value = args[2] if len(args) > 2 else None
        if isinstance(value, Slot):
            v = e.args[value.i]
            if v.op != "const" or not bool((v.attrs.call([]) == 0).all()):
                return None
        elif value != 0:
            return None
        mask = e.args[1]
        while mask.op in ("view", "expand") and tuple(mask.shape) != row_shape:
            mask = mask.args[0]
        if tuple(mask.shape) == row_shape:
            return mask
        # a mask with trailing size-1 dims (``~inside.unsqueeze(-1)``) broadcasts over each row; its
        # elements are in row order, which is all the domain check needs
        if tuple(mask.shape[:len(row_shape)]) == row_shape and all(s == 1 for s in mask.shape[len(row_shape):]):
            return mask
    return None


def match_masked_lookup(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """Find a rank value equal to ``masked_lookup`` of shard ``args[0]`` at ``args[1]``."""
    w_rel, ids_rel = args
    w_t, ids_t = engine.to_term(w_rel), engine.to_term(ids_rel)
    start, vocab = spec.param("start"), spec.param("vocab")
    n = w_rel.shape[0]
    index = engine.index
    domain = torch.arange(vocab, dtype=ids_rel.dtype)
    inside = (domain >= start) & (domain < start + n)
    for emb in index.users_of(w_t):
        if emb.op != "call" or emb.attrs.kind != "embedding" or emb.args[0].id != w_t.id:
            continue
        J = emb.args[1]
        jv = eval_on_domain(J, ids_t, domain)
        if jv is None or not bool((jv[inside] == domain[inside] - start).all()):
            continue
        for e in [emb] + index.users_of(emb):
            d = index.realized(e)
            if d is None:
                continue
            if e is emb:
                ok = not bool((~inside).any())
            else:
                mask = _zeroing_mask(e, emb)
                if mask is None:
                    continue
                mv = eval_on_domain(mask, ids_t, domain)
                ok = mv is not None and bool((mv.bool() == ~inside).all())
            if ok:
                return index.ref(d)
    return None


def _cases(rng):
    for _ in range(3):
        v, h, b, s = C.dims(rng, 4, 12), C.dims(rng), C.dims(rng), C.dims(rng)
        w = C.randn(rng, v, h)
        ids = torch.randint(0, v, (b, s), generator=rng)
        yield C.case(lambda w, i: F.embedding(i, w), (w, ids), rng, split={0: 0},
                     description="embedding over a vocabulary split in uneven shards")


register(Lemma(
    name="vocab-embedding",
    statement="embedding(concat(w_k, 0), ids) = sum_k masked_lookup(w_k, ids, start_k)",
    kinds=("embedding",),
    plans=vocab_embedding,
    cases=_cases,
    conditions=("the table is concatenated along the vocabulary (dim 0)", "ids are integers in [0, V)",
                "each masked_lookup piece is matched by an exhaustive check over all ids"),
    bitwise_safe=True,
    priority=40,
))
register_matcher("masked_lookup", match_masked_lookup)


# ---------------------------------------------------------------------------- backward
@dataclass(frozen=True)
class MaskedEmbeddingBackward:
    """The gradient of shard ``[start, start + n)`` of an embedding table: only in-shard ids count."""

    start: int
    n: int

    def __call__(self, grad: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        valid = (local >= 0) & (local < self.n)
        g = grad * valid.unsqueeze(-1).to(grad.dtype)
        return torch.ops.aten.embedding_dense_backward(g, local.clamp(0, max(self.n - 1, 0)), self.n, -1, False)


def masked_embedding_backward_spec(start: int, n: int, vocab: int) -> OpSpec:
    return OpSpec("masked_embedding_backward", f"masked_embedding_backward[{start}:{start + n}]",
                  MaskedEmbeddingBackward(start, n), ((Slot(0), Slot(1)), ()),
                  (("start", start), ("n", n), ("vocab", vocab)))


def vocab_embedding_backward(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    """embedding_backward(g, ids, V) = concat_k(masked_embedding_backward_k(g, ids)) for the
    vocabulary partitions the program declares (its sharded embedding tables)."""
    targs, _ = spec.template
    if len(targs) < 5 or len(args) != 2 or targs[3] not in (-1, None) or targs[4]:
        return
    vocab = targs[2]
    if not isinstance(vocab, int) or ctx is None:
        return
    grad, ids = args
    for sizes in ctx.partitions(vocab):
        if len(sizes) < 2:
            continue
        pieces, off = [], 0
        for n in sizes:
            pieces.append(S.call(masked_embedding_backward_spec(off, n, vocab), [grad, ids]))
            off += n
        yield S.cat(pieces, 0)


def match_masked_embedding_backward(engine, spec: OpSpec, args: tuple) -> Expr | None:
    g_rel, ids_rel = args
    g_t, ids_t = engine.to_term(g_rel), engine.to_term(ids_rel)
    start, n, vocab = spec.param("start"), spec.param("n"), spec.param("vocab")
    index = engine.index
    domain = torch.arange(vocab, dtype=ids_rel.dtype)
    inside = (domain >= start) & (domain < start + n)
    for masked in index.users_of(g_t):
        mask = _zeroing_mask(masked, g_t)
        if mask is None:
            continue
        mv = eval_on_domain(mask, ids_t, domain)
        if mv is None or not bool((mv.bool() == ~inside).all()):
            continue
        for e in index.users_of(masked):
            if e.op != "call" or e.attrs.kind != "embedding_backward" or e.args[0].id != masked.id:
                continue
            targs, _ = e.attrs.template
            if len(targs) < 3 or targs[2] != n:
                continue
            jv = eval_on_domain(e.args[1], ids_t, domain)
            if jv is None or not bool((jv[inside] == domain[inside] - start).all()):
                continue
            d = index.realized(e)
            if d is not None:
                return index.ref(d)
    return None


class _PartitionContext:
    def __init__(self, sizes):
        self.sizes = sizes

    def partitions(self, size):
        return [self.sizes] if sum(self.sizes) == size else []


def _backward_cases(rng):
    for _ in range(3):
        v, h, b, s = C.dims(rng, 4, 12), C.dims(rng), C.dims(rng), C.dims(rng)
        grad = C.randn(rng, b, s, h)
        ids = torch.randint(0, v, (b, s), generator=rng)
        spec, _ = C.spec_of(lambda g, i: torch.ops.aten.embedding_dense_backward(g, i, v, -1, False), grad, ids)
        case = C.make_case(spec, (grad, ids), rng)
        sizes = C.split_sizes(rng, v, 3)
        yield type(case)(spec, case.args, case.values, case.store,
                         f"embedding backward over vocabulary shards {sizes}", _PartitionContext(tuple(sizes)))


register(Lemma(
    name="vocab-embedding-backward",
    statement="embedding_backward(g, ids, V) = concat_k(masked_embedding_backward(g, ids, start_k, n_k))",
    kinds=("embedding_backward",),
    plans=vocab_embedding_backward,
    cases=_backward_cases,
    conditions=("the vocabulary partition is one the program's inputs declare", "ids are integers in [0, V)",
                "no padding_idx, no scale_grad_by_freq",
                "each piece is matched by an exhaustive check over all ids"),
    bitwise_safe=False,
    priority=40,
    needs_context=True,
))
register_matcher("masked_embedding_backward", match_masked_embedding_backward)
