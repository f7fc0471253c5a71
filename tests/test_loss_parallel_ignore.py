"""Vocab-parallel cross-entropy whose targets may be ignore_index, torchtitan's way (no torchtitan needed).

``F.cross_entropy(x, t, reduction="sum", ignore_index=-100)`` against a loss-parallel rank program
that picks with *safe* labels (``where(t != -100, t, 0)``: an ignored target picks class 0 on the rank
owning it) and zeroes the ignored positions afterwards, with a hand-written backward that zeroes the
ignored rows through the upstream gradient. Without a declared domain the targets range over
``{-100} u [0, V)``: the proof must cover the ignored positions, and dropping either zeroing is a bug.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

import gg_notebook as gg

V = 32
IGNORE = -100


def seq(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1), reduction="sum", ignore_index=IGNORE)


class _LossParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, spelling, bug):
        group = dist.group.WORLD
        W, r = dist.get_world_size(), dist.get_rank()
        local_v = logits.shape[-1]
        start = r * local_v
        m = fc.all_reduce(torch.amax(logits, dim=-1, keepdim=True), "max", group)
        shifted = logits - m
        s = fc.all_reduce(torch.sum(torch.exp(shifted), dim=-1, keepdim=True), "sum", group)
        log_probs = shifted - torch.log(s)
        if spelling == "titan":
            safe = torch.where(labels != IGNORE, labels, 0)
            out_of_range = (safe < start) | (safe >= start + local_v)
            local = safe - start
            local[out_of_range] = 0
            picked = torch.gather(log_probs, -1, local.unsqueeze(-1))
            picked[out_of_range.unsqueeze(-1)] = 0
        else:  # masked_fill and a clamp instead of in-place writes
            safe = labels.masked_fill(labels == IGNORE, 0)
            inside = (safe >= start) & (safe < start + local_v)
            local = (safe - start).clamp(0, local_v - 1)
            picked = log_probs.gather(-1, local[:, None]).masked_fill(~inside[:, None], 0.0)
        picked = fc.all_reduce(picked, "sum", group)
        result = -picked.squeeze(-1)
        if bug != "keep_ignored":
            result = torch.where(labels != IGNORE, result, 0) if spelling == "titan" else \
                result * (labels != IGNORE).to(result.dtype)
        ctx.save_for_backward(log_probs, labels)
        ctx.start, ctx.spelling, ctx.bug = start, spelling, bug
        return result.sum()

    @staticmethod
    def backward(ctx, grad_output):
        log_probs, labels = ctx.saved_tensors
        local_v = log_probs.shape[-1]
        safe = torch.where(labels != IGNORE, labels, 0)
        out_of_range = (safe < ctx.start) | (safe >= ctx.start + local_v)
        local = safe - ctx.start
        local[out_of_range] = 0
        grad_input = torch.zeros_like(log_probs)
        rows = torch.arange(local.shape[0])
        grad_input[rows, local] = out_of_range.to(grad_input.dtype) - 1.0
        if ctx.bug != "grad_of_ignored":
            grad_output = torch.where((labels != IGNORE).unsqueeze(-1), grad_output, 0)
        return (grad_input + torch.exp(log_probs)) * grad_output, None, None, None


def _par(spelling, bug=None):
    def par(logits, labels):
        return _LossParallelCE.apply(logits.flatten(0, 1), labels.flatten(0, 1), spelling, bug)
    return par


def _with_grad(fn):
    def g(logits, labels):
        loss = fn(logits, labels)
        return loss, torch.autograd.grad(loss, logits)[0]
    return g


def _problem(par, grads, W=2, seed=0, declared=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 8, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (2, 8), generator=g)
    if not declared:
        labels[0, 3] = IGNORE  # the example hits the sentinel too (the proof covers it either way)
    s, p = (_with_grad(seq), _with_grad(par)) if grads else (seq, par)
    return gg.Problem(sequential=s, distributed=p, inputs=(logits, labels), placements=(Shard(-1), Replicate()),
                      world_size=W, expect=[Replicate()] + ([Shard(-1)] if grads else []),
                      domains={"labels": range(0, V)} if declared else None)


@pytest.mark.parametrize("spelling", ["titan", "masked"])
@pytest.mark.parametrize("W", [2, 4])
def test_loss_parallel_ce_with_ignored_targets_proved(spelling, W):
    r = gg.verify(_problem(_par(spelling), grads=False, W=W))
    assert r.status == "proved", r


@pytest.mark.parametrize("W", [2, 4])
def test_loss_parallel_ce_grad_with_ignored_targets_proved(W):
    r = gg.verify(_problem(_par("titan"), grads=True, W=W))
    assert r.status == "proved", r


@pytest.mark.parametrize("spelling", ["titan", "masked"])
def test_ignored_positions_not_zeroed_refuted(spelling):
    # rank 0 owns class 0, which an ignored target picks through the safe labels
    r = gg.verify(_problem(_par(spelling, bug="keep_ignored"), grads=False))
    assert r.status == "refuted", r


def test_gradient_of_ignored_rows_not_zeroed_refuted():
    r = gg.verify(_problem(_par("titan", bug="grad_of_ignored"), grads=True))
    assert r.status == "refuted", r


@pytest.mark.parametrize("grads", [False, True])
def test_declared_domain_without_the_sentinel_ranks_still_zeroing_proved(grads):
    # labels declared in [0, V): the ranks' zeroing of -100 is the identity there
    r = gg.verify(_problem(_par("titan"), grads=grads, declared=True))
    assert r.status == "proved", r
    assert any("declared" in d for d in r.domain_assumptions), r.domain_assumptions
