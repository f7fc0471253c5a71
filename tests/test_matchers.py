"""The vocab-parallel matchers accept any correct spelling of the masking and nothing else.

They decide by an exhaustive check over every token id, so they are exercised here with several
ways users write the same masked lookup, and with near-miss bugs that must be refuted."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg

V, H = 32, 8


def seq_embed(ids, w):
    return F.embedding(ids, w)


def _range():
    r, n = dist.get_rank(), V // dist.get_world_size()
    return r * n, (r + 1) * n


def tp_index_put(ids, w):
    s, e = _range()
    mask = (ids < s) | (ids >= e)
    local = ids - s
    local[mask] = 0
    out = F.embedding(local, w)
    out[mask, :] = 0.0
    dist.all_reduce(out)
    return out


def tp_masked_fill(ids, w):
    s, e = _range()
    inside = (ids >= s) & (ids < e)
    local = torch.where(inside, ids - s, torch.zeros_like(ids))
    out = F.embedding(local, w).masked_fill(~inside.unsqueeze(-1), 0.0)
    dist.all_reduce(out)
    return out


def tp_clamp(ids, w):
    s, e = _range()
    mask = torch.logical_or(ids < s, ids > e - 1)
    local = (ids - s).clamp(0, e - s - 1)
    out = F.embedding(local, w).masked_fill(mask.unsqueeze(-1), 0)
    dist.all_reduce(out)
    return out


def tp_off_by_one_mask(ids, w):
    s, e = _range()
    mask = (ids < s) | (ids > e)  # bug: id == e is looked up on this rank too
    local = (ids - s).clamp(0, e - s - 1)
    out = F.embedding(local, w).masked_fill(mask.unsqueeze(-1), 0)
    dist.all_reduce(out)
    return out


def tp_wrong_shift(ids, w):
    s, e = _range()
    mask = (ids < s) | (ids >= e)
    local = torch.where(mask, torch.zeros_like(ids), ids - s + 1).clamp(0, e - s - 1)  # bug: shifted by one
    out = F.embedding(local, w).masked_fill(mask.unsqueeze(-1), 0)
    dist.all_reduce(out)
    return out


def _problem(fn, W=2):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (3, 5), generator=g)
    ids[0, :4] = torch.tensor([0, V // 2 - 1, V // 2, V - 1])  # shard boundaries
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    return gg.Problem(seq_embed, fn, (ids, w), (gg.Replicate(), gg.Shard(0)), W, expect=(gg.Replicate(),))


@pytest.mark.parametrize("fn", [tp_index_put, tp_masked_fill, tp_clamp])
@pytest.mark.parametrize("W", [2, 4])
def test_correct_spellings_are_proved(fn, W):
    r = gg.verify(_problem(fn, W))
    assert r.status is gg.Status.PROVED, str(r)


@pytest.mark.parametrize("fn", [tp_off_by_one_mask, tp_wrong_shift])
def test_near_misses_are_refuted(fn):
    r = gg.verify(_problem(fn))
    assert r.status is gg.Status.REFUTED, str(r)
    assert r.culprit.op.startswith("aten.embedding")


def test_domain_evaluation_refuses_non_elementwise_terms():
    """Only elementwise integer arithmetic may be checked on the id domain: an index_put with
    integer indices (a scatter) or a permute would tie elements to positions, not to ids."""
    from gg_notebook.lemmas._cases import spec_of
    from gg_notebook.lemmas.domain import eval_on_domain
    from gg_notebook.relations.expr import ExprStore

    S = ExprStore()
    ids = S.atom("ids", (2, 3), torch.int64)
    dom = torch.arange(12)
    ok_spec, _ = spec_of(lambda t: t - 4, torch.zeros(2, 3, dtype=torch.int64))
    assert torch.equal(eval_on_domain(S.call(ok_spec, [ids]), ids, dom), dom - 4)
    mask_spec, _ = spec_of(lambda t, m, v: torch.ops.aten.index_put(t, [m], v),
                           torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.bool),
                           torch.tensor(0))
    lt_spec, _ = spec_of(lambda t: t < 5, torch.zeros(2, 3, dtype=torch.int64))
    masked = S.call(mask_spec, [ids, S.call(lt_spec, [ids]), S.const(_zero_spec(), (), torch.int64)])
    assert torch.equal(eval_on_domain(masked, ids, dom), torch.where(dom < 5, 0, dom))
    scatter_spec, _ = spec_of(lambda t, i, v: torch.ops.aten.index_put(t, [i], v),
                              torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64),
                              torch.tensor(0))
    scattered = S.call(scatter_spec, [ids, ids, S.const(_zero_spec(), (), torch.int64)])
    assert eval_on_domain(scattered, ids, dom) is None
    assert eval_on_domain(S.permute(ids, (1, 0)), ids, dom) is None


def _zero_spec():
    from gg_notebook.ir.lower import _Full
    from gg_notebook.relations.expr import OpSpec

    return OpSpec("const", "full(0)", _Full((), 0, torch.int64), ((), ()))
