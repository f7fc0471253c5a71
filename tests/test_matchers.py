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
