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
from gg_notebook.lemmas.domain import eval_on_domain, shard_of
from gg_notebook.lemmas.masking import kept_rows
from gg_notebook.relations.domains import IdDomain
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


def masked_lookup_spec(start: int, vocab: int, domain: IdDomain | None = None) -> OpSpec:
    domain = IdDomain.range(0, vocab) if domain is None else domain
    return OpSpec("masked_lookup", f"masked_lookup[{start}:]", MaskedLookup(start), ((Slot(0), Slot(1)), ()),
                  (("start", start), ("vocab", vocab), ("domain", domain)))


def vocab_embedding(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    w, ids = args[0], args[1]
    if w.op != "cat" or w.attrs != 0 or ids.dtype not in (torch.int64, torch.int32):
        return
    vocab = w.shape[0]
    # aten.embedding accepts ids in [0, V) (anything else raises); a declared domain may narrow it
    domain = IdDomain.range(0, vocab) if ctx is None else \
        ctx.domain_of(ids, IdDomain.range(0, vocab), "ids of aten.embedding")
    pieces, off = [], 0
    for part in w.args:
        pieces.append(S.call(masked_lookup_spec(off, vocab, domain), [part, ids]))
        off += part.shape[0]
    yield S.accum("sum", pieces)


def _keeps(e: Expr, x: Expr, ids_t: Expr, domain: torch.Tensor, inside: torch.Tensor,
           row_shape: tuple | None = None) -> bool:
    """``e`` is ``x`` with exactly the rows of out-of-shard ids zeroed (checked on every id)."""
    keep = kept_rows(e, x, row_shape)
    if keep is None:
        return False
    kv = keep(lambda m: eval_on_domain(m, ids_t, domain))
    return kv is not None and bool((kv == inside).all())


def match_masked_lookup(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """Find a rank value equal to ``masked_lookup`` of shard ``args[0]`` at ``args[1]``."""
    w_rel, ids_rel = args
    w_t, ids_t = engine.to_term(w_rel), engine.to_term(ids_rel)
    start, vocab = spec.param("start"), spec.param("vocab")
    n = w_rel.shape[0]
    index = engine.index
    domain = spec.param("domain").values(ids_rel.dtype)
    shard = shard_of(domain, start, start + n)
    for emb in index.users_of(w_t):
        if emb.op != "call" or emb.attrs.kind != "embedding" or emb.args[0].id != w_t.id:
            continue
        J = emb.args[1]
        jv = eval_on_domain(J, ids_t, domain)
        if jv is None or not shard.local_ids_agree(jv):
            continue
        for e in [emb] + index.users_of(emb):
            d = index.realized(e)
            if d is None:
                continue
            ok = shard.covers_domain() if e is emb else _keeps(e, emb, ids_t, domain, shard.inside)
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
    conditions=("the table is concatenated along the vocabulary (dim 0)",
                "ids are integers in [0, V) (what aten.embedding accepts) or a declared narrower domain",
                "each masked_lookup piece is matched by an exhaustive check over all ids of the domain"),
    bitwise_safe=True,
    priority=40,
    needs_context=True,
    on=((torch.ops.aten.embedding.default, (), ("padding_idx", "scale_grad_by_freq", "sparse")),),  # backward-only
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


def masked_embedding_backward_spec(start: int, n: int, vocab: int, domain: IdDomain | None = None) -> OpSpec:
    domain = IdDomain.range(0, vocab) if domain is None else domain
    return OpSpec("masked_embedding_backward", f"masked_embedding_backward[{start}:{start + n}]",
                  MaskedEmbeddingBackward(start, n), ((Slot(0), Slot(1)), ()),
                  (("start", start), ("n", n), ("vocab", vocab), ("domain", domain)))


def vocab_embedding_backward(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    """embedding_backward(g, ids, V) = concat_k(masked_embedding_backward_k(g, ids)) for the
    vocabulary partitions the program declares (its sharded embedding tables)."""
    if len(args) != 2 or spec.arg("padding_idx") not in (-1, None) or spec.arg("scale_grad_by_freq") is not False:
        return
    vocab = spec.arg("num_weights")
    if not isinstance(vocab, int) or ctx is None:
        return
    grad, ids = args
    domain = ctx.domain_of(ids, IdDomain.range(0, vocab), "ids of aten.embedding (backward)")
    for sizes in ctx.partitions(vocab):
        if len(sizes) < 2:
            continue
        pieces, off = [], 0
        for n in sizes:
            pieces.append(S.call(masked_embedding_backward_spec(off, n, vocab, domain), [grad, ids]))
            off += n
        yield S.cat(pieces, 0)


def match_masked_embedding_backward(engine, spec: OpSpec, args: tuple) -> Expr | None:
    g_rel, ids_rel = args
    g_t, ids_t = engine.to_term(g_rel), engine.to_term(ids_rel)
    start, n, vocab = spec.param("start"), spec.param("n"), spec.param("vocab")
    index = engine.index
    domain = spec.param("domain").values(ids_rel.dtype)
    shard = shard_of(domain, start, start + n)
    for masked in index.users_of(g_t):
        if not _keeps(masked, g_t, ids_t, domain, shard.inside):
            continue
        for e in index.users_of(masked):
            if e.op != "call" or e.attrs.kind != "embedding_backward" or e.args[0].id != masked.id:
                continue
            # the rank's backward must be the plain one: its own table size, no padding row, no
            # frequency scaling (each changes the gradient)
            if (e.attrs.arg("num_weights") != n or e.attrs.arg("padding_idx") not in (-1, None)
                    or e.attrs.arg("scale_grad_by_freq") is not False):
                continue
            jv = eval_on_domain(e.args[1], ids_t, domain)
            if jv is None or not shard.local_ids_agree(jv):
                continue
            d = index.realized(e)
            if d is not None:
                return index.ref(d)
    return None


def _backward_cases(rng):
    for _ in range(3):
        v, h, b, s = C.dims(rng, 4, 12), C.dims(rng), C.dims(rng), C.dims(rng)
        grad = C.randn(rng, b, s, h)
        ids = torch.randint(0, v, (b, s), generator=rng)
        spec, _ = C.spec_of(lambda g, i: torch.ops.aten.embedding_dense_backward(g, i, v, -1, False), grad, ids)
        case = C.make_case(spec, (grad, ids), rng)
        sizes = C.split_sizes(rng, v, 3)
        yield type(case)(spec, case.args, case.values, case.store,
                         f"embedding backward over vocabulary shards {sizes}", C.CaseContext(partition=tuple(sizes)))


register(Lemma(
    name="vocab-embedding-backward",
    statement="embedding_backward(g, ids, V) = concat_k(masked_embedding_backward(g, ids, start_k, n_k))",
    kinds=("embedding_backward",),
    plans=vocab_embedding_backward,
    cases=_backward_cases,
    conditions=("the vocabulary partition is one the program's inputs declare",
                "ids are integers in [0, V) or a declared narrower domain",
                "no padding_idx, no scale_grad_by_freq (on both sides)",
                "each piece is matched by an exhaustive check over all ids"),
    bitwise_safe=False,
    priority=40,
    needs_context=True,
    on=((torch.ops.aten.embedding_dense_backward.default, ("num_weights", "padding_idx", "scale_grad_by_freq"), ()),),
))
register_matcher("masked_embedding_backward", match_masked_embedding_backward)
