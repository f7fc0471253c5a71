"""Batch 1 (a frontier model's micro-batch): shapes with a leading dim of size 1.

At batch 1 the lowering drops the unsqueeze ``[N, V] -> [1, N, V]`` in front of a broadcasting multiply
(``grad_input * grad_output.unsqueeze(-1)`` reads the ``[N, V]`` gradient directly), so a matcher looking
for ``x * f`` must also accept the broadcast of a view-family member that only lacks leading 1-dims.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

import gg_notebook as gg
from gg_notebook.examples import gpt
from gg_notebook.examples.vocab_cross_entropy import cross_entropy_tp

V = 64


def ce_mean(logits, target):
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1), reduction="none")
    return loss, torch.autograd.grad(loss.mean(), [logits])[0]


def ce_sum_over_n(logits, target):
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    (g,) = torch.autograd.grad(loss.sum() / loss.numel(), logits)
    return loss, g


def ce_tp_mean(logits, target):
    loss = cross_entropy_tp(logits, target)
    return loss, torch.autograd.grad(loss.mean(), [logits])[0]


def ce_tp_mean_backward(logits, target):
    logits = logits.detach().requires_grad_()
    loss = cross_entropy_tp(logits, target)
    loss.mean().backward()
    return loss.detach(), logits.grad


def ce_tp_sum(logits, target):  # wrong: the gradient of the summed loss, not of its mean
    loss = cross_entropy_tp(logits, target)
    return loss, torch.autograd.grad(loss.sum(), [logits])[0]


def ce_tp_mean_rank_scaled(logits, target):  # wrong on rank 1 only: its logits' gradient doubled
    loss, g = ce_tp_mean(logits, target)
    return loss, g * (1.0 + dist.get_rank())


def _problem(seq, dist_fn, batch, world_size=2):
    g = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, 8, V, dtype=torch.float64, generator=g).requires_grad_()
    target = torch.randint(0, V, (batch, 8), generator=g)
    return gg.Problem(seq, dist_fn, [logits, target], [Shard(-1), Replicate()], world_size,
                      expect=[Replicate(), Shard(-1)], domains={"target": range(V)}, input_names=("logits", "target"))


@pytest.mark.parametrize("seq, dist_fn, batch", [(ce_mean, ce_tp_mean, 1), (ce_sum_over_n, ce_tp_mean_backward, 1),
                                                 (ce_mean, ce_tp_mean_backward, 2)])
def test_vocab_parallel_cross_entropy_backward_proved(seq, dist_fn, batch):
    r = gg.verify(_problem(seq, dist_fn, batch))
    assert r.status is gg.Status.PROVED, r


@pytest.mark.parametrize("dist_fn", [ce_tp_sum, ce_tp_mean_rank_scaled])
def test_wrong_gradient_factor_at_batch_one_refuted(dist_fn):
    r = gg.verify(_problem(ce_mean, dist_fn, 1))
    assert r.status is gg.Status.REFUTED, r


def test_gpt_forward_backward_at_batch_one_proved():
    # the 405B benchmark's micro-batch: the loss gradient's row factor at batch 1, TP 4
    r = gg.verify(gpt.make(4, layers=1, backward=True, batch=1, hidden=16, heads=4, vocab=64, seq=8))
    assert r.status is gg.Status.PROVED, r
