"""A value held whole added to a partial sum (a row-parallel output whose all-reduce is missing,
then a residual add and an RMSNorm): the culprit names the add, says which input is only known as
per-rank partials, and where that input was computed."""

from __future__ import annotations

import torch

import gg_notebook as gg


def block(x, w1, w2):
    h = x + (x @ w1) @ w2
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).sum()


def block_tp_no_reduce(x, w1, w2):
    out = torch.matmul(x @ w1, w2)      # row-parallel: a partial sum on each rank
    h = x + out                         # BUG: no all-reduce before the residual add
    return (h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-6)).sum()


def test_residual_added_to_a_partial_sum_is_refuted_with_the_partial_input_named():
    p = gg.Problem(sequential=block, distributed=block_tp_no_reduce,
                   inputs=[torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 8)],
                   placements=[gg.Replicate(), gg.Shard(1), gg.Shard(0)], world_size=2, expect=[gg.Replicate()])
    r = gg.verify(p, capture="inprocess")
    assert r.status == gg.Status.REFUTED, r
    assert r.culprit.source.endswith(f":{block.__code__.co_firstlineno + 1}"), r.culprit
    assert "per-rank partials" in r.culprit.detail and "all-reduce missing" in r.culprit.detail, r.culprit.detail
    assert "h = x + (x @ w1) @ w2" in r.culprit.detail, r.culprit.detail   # where the partial input comes from
