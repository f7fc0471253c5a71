"""Pattern 1, scalar algebra: means, averages, loss scaling, gradients of a mean, nested reductions.

Data-parallel programs: the batch is split over the ranks (``Shard(0)``), each rank computes its
local mean and the ranks combine them with an all-reduce. Every spelling is exact over the reals
(equal shards), so each must be proved; each bug is a wrong scale factor, found on its line.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg

from ._case import SpellingCase, rn

R, S0 = gg.Replicate(), gg.Shard(0)
MISSING_SCALAR = "scalar algebra: no normal form for sums with rational coefficients (mean = sum/n, AVG, / world_size)"


# --- data-parallel mean loss -------------------------------------------------------------------
# spec: mean squared error of a linear model over the whole batch

def mse(x, w, y):
    err = x @ w - y
    return (err ** 2).mean()  # gg: loss


def dp_mse_sum_div(x, w, y):
    loss = ((x @ w - y) ** 2).mean()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def dp_mse_avg(x, w, y):
    loss = (x @ w - y).square().mean()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss


def dp_mse_gather_mean(x, w, y):
    loss = (x @ w - y).pow(2).mean()
    losses = [torch.zeros_like(loss) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss)
    return torch.stack(losses).mean()


def dp_mse_div_first(x, w, y):
    loss = torch.mean(torch.square(x @ w - y)) / dist.get_world_size()
    dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    return loss


def dp_mse_global_count(x, w, y):
    total = ((x @ w - y) ** 2).sum()
    dist.all_reduce(total)
    return total / (x.shape[0] * dist.get_world_size() * y.shape[1])


def dp_mse_no_div(x, w, y):
    loss = ((x @ w - y) ** 2).mean()
    dist.all_reduce(loss)  # BUG: the sum of the ranks' means, never divided by the world size
    return loss


def dp_mse_div_twice(x, w, y):
    loss = ((x @ w - y) ** 2).mean() / dist.get_world_size()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()  # BUG: already divided before the all-reduce


def dp_mse_avg_then_div(x, w, y):
    loss = (x @ w - y).square().mean()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    loss = loss / dist.get_world_size()  # BUG: AVG already averaged over the ranks
    return loss


def _mse_inputs():
    return [rn(8, 4), rn(4, 3, seed=1), rn(8, 3, seed=2)]


# --- loss scaled by micro-batches / gradient-accumulation steps --------------------------------

MICRO = 2


def microbatch_accumulate(x, w, y):
    loss = torch.zeros((), dtype=x.dtype)
    for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO)):
        loss = loss + ((xm @ w - ym) ** 2).mean() / MICRO
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def microbatch_stack_mean(x, w, y):
    losses = [F.mse_loss(xm @ w, ym) for xm, ym in zip(torch.split(x, x.shape[0] // MICRO), y.split(y.shape[0] // MICRO))]
    loss = torch.stack(losses).mean()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss


def microbatch_scale_once(x, w, y):
    num_steps = MICRO * dist.get_world_size()
    total = None
    for step in range(MICRO):
        xm, ym = x[step::MICRO], y[step::MICRO]
        scaled = ((xm @ w - ym) ** 2).mean() / num_steps
        total = scaled if total is None else total + scaled
    dist.all_reduce(total)
    return total


def microbatch_strided_global_count(x, w, y):
    # per-micro-batch sums of squared errors over strided rows, normalized once by the global count
    total = sum(((x[k::MICRO] @ w - y[k::MICRO]) ** 2).sum() for k in range(MICRO))
    dist.all_reduce(total)
    return total / (y.numel() * dist.get_world_size())


def microbatch_strided_no_micro_scale(x, w, y):
    total = torch.zeros((), dtype=x.dtype)
    for k in range(MICRO):
        total += torch.mean((x[k::MICRO] @ w - y[k::MICRO]).square())  # BUG: not divided by MICRO
    dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total


def microbatch_sum_losses(x, w, y):
    losses = [((xm @ w - ym) ** 2).mean() for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO))]
    loss = sum(losses) / len(losses)
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def microbatch_unscaled(x, w, y):
    loss = torch.zeros((), dtype=x.dtype)
    for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO)):
        loss = loss + ((xm @ w - ym) ** 2).mean()  # BUG: each micro-batch loss not divided by MICRO
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


# --- gradients of a mean (torch.autograd.grad inside the program) ------------------------------

def grad_of_mean_seq(x, w, y):
    h = x @ w  # gg: matmul (and, in the backward, the weight gradient x^T @ dh)
    loss = ((h - y) ** 2).mean()
    (gw,) = torch.autograd.grad(loss, [w])
    return gw


def grad_allreduce_div(x, w, y):
    loss = ((x @ w - y) ** 2).mean()
    (gw,) = torch.autograd.grad(loss, [w])
    dist.all_reduce(gw)
    return gw / dist.get_world_size()


def grad_allreduce_avg(x, w, y):
    loss = F.mse_loss(x @ w, y)
    gw = torch.autograd.grad(loss, w)[0]
    dist.all_reduce(gw, op=dist.ReduceOp.AVG)
    return gw


def grad_prescaled_loss(x, w, y):
    loss = ((x @ w - y) ** 2).mean() / dist.get_world_size()
    (gw,) = torch.autograd.grad(loss, [w])
    dist.all_reduce(gw)
    return gw


def grad_of_sum_over_global_count(x, w, y):
    n_global = x.shape[0] * dist.get_world_size() * y.shape[-1]
    loss = ((x @ w - y) ** 2).sum() / n_global
    (gw,) = torch.autograd.grad(loss, [w])
    dist.all_reduce(gw)
    return gw


def grad_allreduce_no_div(x, w, y):
    loss = ((x @ w - y) ** 2).mean()
    (gw,) = torch.autograd.grad(loss, [w])
    dist.all_reduce(gw)  # BUG: summed gradients of per-rank means: world_size times too large
    return gw


def _grad_inputs():
    return [rn(8, 4), rn(4, 3, seed=1).requires_grad_(), rn(8, 3, seed=2)]


# --- nested reductions -------------------------------------------------------------------------
# spec: the total of a batch-sharded activation

def total_seq(x, w):
    h = x @ w
    return h.sum()  # gg: total


def total_nested(x, w):
    t = (x @ w).sum(-1).sum()
    dist.all_reduce(t)
    return t


def total_dims(x, w):
    t = torch.sum(torch.matmul(x, w), dim=(0, 1))
    dist.all_reduce(t)
    return t


def total_flat(x, w):
    t = (x @ w).reshape(-1).sum(0)
    dist.all_reduce(t)
    return t


def total_keepdim(x, w):
    t = (x @ w).sum(dim=1, keepdim=True).sum(dim=0, keepdim=True).squeeze()
    dist.all_reduce(t)
    return t


def total_mean_inside(x, w):
    t = (x @ w).mean(-1).sum()  # BUG: a mean over the features where the spec sums them
    dist.all_reduce(t)
    return t


def _total_inputs():
    return [rn(8, 4), rn(4, 3, seed=1)]


# --- mean of per-rank means over equal shards --------------------------------------------------
# spec: per-feature mean over the batch (output [features]), replicated

def feature_mean_seq(x):
    return x.mean(0)  # gg: mean


def feature_mean_of_means(x):
    m = x.mean(dim=0)
    dist.all_reduce(m)
    return m / dist.get_world_size()


def feature_mean_gather(x):
    m = x.mean(0, keepdim=True)
    out = torch.empty(dist.get_world_size(), x.shape[1], dtype=x.dtype)
    dist.all_gather_into_tensor(out, m)
    return out.mean(0)


def feature_mean_nested(x):
    # local mean of the means of two halves of the local batch, then the mean over ranks
    m = torch.stack([h.mean(0) for h in x.chunk(2)]).mean(0)
    dist.all_reduce(m, op=dist.ReduceOp.AVG)
    return m


def feature_mean_sum_count(x):
    s = x.sum(0)
    n = torch.tensor(float(x.shape[0]), dtype=x.dtype)
    dist.all_reduce(s)
    dist.all_reduce(n)
    return s / n


def feature_mean_gather_sum(x):
    m = x.mean(0, keepdim=True)
    out = torch.empty(dist.get_world_size(), x.shape[1], dtype=x.dtype)
    dist.all_gather_into_tensor(out, m)
    return out.sum(0)  # BUG: the sum of the ranks' means, not their mean


def feature_sum_gather_count(x):
    s = x.sum(0, keepdim=True)
    world = dist.get_world_size()
    sums = torch.empty(world, x.shape[1], dtype=x.dtype)
    dist.all_gather_into_tensor(sums, s)
    return sums.sum(dim=0) / (x.shape[0] * world)


def feature_sum_gather_local_count(x):
    s = x.sum(0, keepdim=True)
    sums = torch.empty(dist.get_world_size(), x.shape[1], dtype=x.dtype)
    dist.all_gather_into_tensor(sums, s)
    return sums.sum(dim=0) / x.shape[0]  # BUG: divided by the local batch size, not the global one


def _feature_inputs():
    return [rn(8, 5)]


def _c(name, seq, dist_fn, inputs, placements, *, missing=None, world_size=2, culprit=None, twin=None, note=""):
    return SpellingCase(name=name, pattern="scalar", sequential=seq, distributed=dist_fn, inputs=inputs,
                        placements=placements, world_size=world_size, expect=[R], bug=twin is not None,
                        missing=missing or MISSING.get(name), culprit=culprit, twin=twin, note=note)


# Why each case is not proved (or its bug not localized) yet: the missing engine mechanism.
# tests/test_spellings.py marks these xfail(strict=True, reason=...); diagnosis in the lead's notes.
_SCALAR = ("scalar algebra: seq mean over a dim-0-sharded tensor is (1/W) * sum_r mean@r; needs relations with "
           "rational coefficients (mean = sum/n, / world_size, ReduceOp.AVG) that cancel")
_GRAD = ("scalar algebra in the backward: seq mean-backward is const/24, the rank's const/12, so seq mul_1 = "
         "1/2 * concat(mul_1@r); needs coefficient relations through the weight-gradient mm to the all-reduce / W")
MISSING = {
}

CASES = [
    _c("dp-mean/allreduce-sum-div", mse, dp_mse_sum_div, _mse_inputs, [S0, R, S0]),
    _c("dp-mean/reduceop-avg", mse, dp_mse_avg, _mse_inputs, [S0, R, S0]),
    _c("dp-mean/gather-stack-mean", mse, dp_mse_gather_mean, _mse_inputs, [S0, R, S0]),
    _c("dp-mean/divide-before-reduce", mse, dp_mse_div_first, _mse_inputs, [S0, R, S0]),
    _c("dp-mean/global-count", mse, dp_mse_global_count, _mse_inputs, [S0, R, S0]),
    _c("dp-mean/dp4-sum-div", mse, dp_mse_sum_div, _mse_inputs, [S0, R, S0], world_size=4),
    _c("dp-mean/bug-no-div", mse, dp_mse_no_div, _mse_inputs, [S0, R, S0], culprit="loss", twin="dp-mean/allreduce-sum-div"),
    _c("dp-mean/bug-div-twice", mse, dp_mse_div_twice, _mse_inputs, [S0, R, S0], culprit="loss", twin="dp-mean/divide-before-reduce"),
    _c("dp-mean/bug-avg-then-div", mse, dp_mse_avg_then_div, _mse_inputs, [S0, R, S0], culprit="loss", twin="dp-mean/reduceop-avg"),
    _c("microbatch/accumulate-div", mse, microbatch_accumulate, _mse_inputs, [S0, R, S0]),
    _c("microbatch/stack-mean-avg", mse, microbatch_stack_mean, _mse_inputs, [S0, R, S0]),
    _c("microbatch/strided-scale-once", mse, microbatch_scale_once, _mse_inputs, [S0, R, S0]),
    _c("microbatch/python-sum", mse, microbatch_sum_losses, _mse_inputs, [S0, R, S0]),
    _c("microbatch/bug-unscaled", mse, microbatch_unscaled, _mse_inputs, [S0, R, S0], culprit="loss", twin="microbatch/accumulate-div"),
    _c("microbatch/strided-global-count", mse, microbatch_strided_global_count, _mse_inputs, [S0, R, S0]),
    _c("microbatch/bug-strided-no-micro-scale", mse, microbatch_strided_no_micro_scale, _mse_inputs, [S0, R, S0],
       culprit="loss", twin="microbatch/strided-global-count"),
    _c("grad-mean/allreduce-div", grad_of_mean_seq, grad_allreduce_div, _grad_inputs, [S0, R, S0]),
    _c("grad-mean/allreduce-avg", grad_of_mean_seq, grad_allreduce_avg, _grad_inputs, [S0, R, S0]),
    _c("grad-mean/prescaled-loss", grad_of_mean_seq, grad_prescaled_loss, _grad_inputs, [S0, R, S0]),
    _c("grad-mean/sum-over-global-count", grad_of_mean_seq, grad_of_sum_over_global_count, _grad_inputs, [S0, R, S0]),
    _c("grad-mean/bug-no-div", grad_of_mean_seq, grad_allreduce_no_div, _grad_inputs, [S0, R, S0], culprit="matmul", twin="grad-mean/allreduce-div"),
    _c("nested-sum/sum-last-then-sum", total_seq, total_nested, _total_inputs, [S0, R]),
    _c("nested-sum/sum-dims-tuple", total_seq, total_dims, _total_inputs, [S0, R]),
    _c("nested-sum/flatten-sum", total_seq, total_flat, _total_inputs, [S0, R]),
    _c("nested-sum/keepdim-squeeze", total_seq, total_keepdim, _total_inputs, [S0, R]),
    _c("nested-sum/bug-mean-inside", total_seq, total_mean_inside, _total_inputs, [S0, R], culprit="total", twin="nested-sum/sum-last-then-sum"),
    _c("mean-of-means/allreduce-div", feature_mean_seq, feature_mean_of_means, _feature_inputs, [S0]),
    _c("mean-of-means/gather-mean", feature_mean_seq, feature_mean_gather, _feature_inputs, [S0]),
    _c("mean-of-means/nested-avg", feature_mean_seq, feature_mean_nested, _feature_inputs, [S0]),
    _c("mean-of-means/sum-and-count", feature_mean_seq, feature_mean_sum_count, _feature_inputs, [S0]),
    _c("mean-of-means/bug-gather-sum", feature_mean_seq, feature_mean_gather_sum, _feature_inputs, [S0], culprit="mean", twin="mean-of-means/gather-mean"),
    _c("mean-of-means/gather-sums-global-count", feature_mean_seq, feature_sum_gather_count, _feature_inputs, [S0]),
    _c("mean-of-means/gather-sums-tp4", feature_mean_seq, feature_sum_gather_count, _feature_inputs, [S0], world_size=4),
    _c("mean-of-means/bug-local-count", feature_mean_seq, feature_sum_gather_local_count, _feature_inputs, [S0],
       culprit="mean", twin="mean-of-means/gather-sums-global-count"),
]
