"""Padding operators through shards (the ``pad-commute`` lemma, `gg_notebook/lemmas/pads.py`; its
random instances are checked in tests/test_lemmas.py): RoPE's ``rotate_half`` backward
(``slice_backward``) on heads sharded over the ranks, in two spellings, and ``F.pad`` /
``constant_pad_nd`` of a dim the ranks do not split are proved; a pad on the wrong side is refuted."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotate_half_narrow(x):
    h = x.shape[-1] // 2
    return torch.cat((torch.neg(torch.narrow(x, -1, h, h)), torch.narrow(x, -1, 0, h)), dim=-1)


def _rope_grad(rot, heads):
    def program(x, w, cos, sin):
        q = (x @ w).unflatten(-1, (heads, -1)).transpose(1, 2)          # [B, heads, S, D]
        y = q * cos + rot(q) * sin
        loss = (y * y).sum()
        (gw,) = torch.autograd.grad(loss, [w])
        return loss, gw
    return program


def _rope_grad_tp(rot, heads, W):
    def program(x, w, cos, sin):
        q = (x @ w).unflatten(-1, (heads // W, -1)).transpose(1, 2)
        y = q * cos + rot(q) * sin
        loss = (y * y).sum()
        (gw,) = torch.autograd.grad(loss, [w])
        dist.all_reduce(loss)
        return loss, gw
    return program


@pytest.mark.parametrize("rot", [_rotate_half, _rotate_half_narrow], ids=["slicing", "narrow"])
def test_rotate_half_backward_on_sharded_heads_is_proved(rot):
    W, heads, D = 2, 4, 8
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 5, 16, generator=g), torch.randn(16, heads * D, generator=g, requires_grad=True),
              torch.randn(5, D, generator=g), torch.randn(5, D, generator=g)]
    p = gg.Problem(sequential=_rope_grad(rot, heads), distributed=_rope_grad_tp(rot, heads, W), inputs=inputs,
                   placements=[gg.Replicate(), gg.Shard(1), gg.Replicate(), gg.Replicate()], world_size=W,
                   expect=[gg.Replicate(), gg.Shard(1)])
    r = gg.verify(p, capture="inprocess")
    assert r.status == gg.Status.PROVED, r


def _pad_rows(x):
    return F.pad(x, (1, 2))                      # pads the last dim; the ranks hold row blocks


def _pad_rows_method(x):
    return torch.constant_pad_nd(x * 2, [1, 1, 0, 0]) * 0.5     # the last dim of a [4, 2, 5] tensor


def _pad_outer_dim(x):
    return torch.constant_pad_nd(x * 2, [0, 0, 0, 0, 1, 1]) * 0.5


def test_pad_of_another_dim_commutes_with_the_shards():
    p = gg.Problem(sequential=_pad_rows, distributed=_pad_rows, inputs=[torch.randn(4, 3, 5)],
                   placements=[gg.Shard(0)], world_size=2, expect=[gg.Shard(0)])
    assert gg.verify(p, capture="inprocess").status == gg.Status.PROVED
    p = gg.Problem(sequential=_pad_rows_method, distributed=_pad_rows_method, inputs=[torch.randn(4, 2, 5)],
                   placements=[gg.Shard(1)], world_size=2, expect=[gg.Shard(1)])
    assert gg.verify(p, capture="inprocess").status == gg.Status.PROVED


def test_pad_of_an_outer_dim_commutes_with_the_shards():
    p = gg.Problem(sequential=_pad_outer_dim, distributed=_pad_outer_dim, inputs=[torch.randn(4, 2, 5)],
                   placements=[gg.Shard(1)], world_size=2, expect=[gg.Shard(1)])
    assert gg.verify(p, capture="inprocess").status == gg.Status.PROVED


def test_pad_on_the_wrong_side_is_refuted():
    def pad_tp(x):  # (2, 1) instead of (1, 2)
        return F.pad(x, (2, 1))
    p = gg.Problem(sequential=_pad_rows, distributed=pad_tp, inputs=[torch.randn(4, 3, 5)],
                   placements=[gg.Shard(0)], world_size=2, expect=[gg.Shard(0)])
    r = gg.verify(p, capture="inprocess")
    assert r.status == gg.Status.REFUTED, r
