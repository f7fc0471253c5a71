"""Data parallel training steps written with plain ``torch.distributed``: DDP, gradient accumulation,
gradient clipping by the global norm, ZeRO-1 and ZeRO-3 / FSDP. One verifiable program each, from
the batch to the updated parameters and optimizer state.

The model is `zero.py`'s two-layer tanh MLP (``mlp(x, y, w1, w2)``: ``w1: (d, h)``, ``w2: (h, d)``,
mean squared error) and the optimizers are its Adam and SGD with momentum; AdamW is Adam after
PyTorch's *decoupled* weight decay ``p * (1 - lr * wd)``. The specification (`train_step`) takes one
step on the whole batch; with clipping it scales the gradients by ``min(1, max_norm / (norm + eps))``
of their global 2-norm.

* DDP (`ddp_step`): every rank holds the parameters and optimizer state (``Replicate()``) and its rows
  of the batch (``Shard(0)``); each gradient is all-reduced with ``ReduceOp.AVG`` (or ``SUM`` then
  ``/= world_size``, or ``torch._foreach_div_``, or one flat bucket), optionally over micro-batches
  (each micro-batch's loss divided by their number, gradients summed locally, one all-reduce) and
  clipped (``clip_grad_norm_``, by hand with ``stack``/``clamp``, ``where``, ``minimum``, foreach).
* ZeRO-1 (`zero1_step`): gradients all-reduced (and clipped) as in DDP; the optimizer state sharded by
  rows (``Shard(0)`` of each parameter's state): each rank steps its rows, the rows are all-gathered.
* ZeRO-3 / FSDP (`fsdp_step`): parameters sharded by rows; each layer's weight all-gathered with
  ``all_gather_into_tensor`` for the forward (``manual``: and again in the backward, by a custom
  autograd function), gradients reduce-scattered with ``AVG`` (or ``SUM`` then divided), clipped on
  the shards (local squared norms all-reduced with ``SUM``, then ``sqrt``), sharded AdamW state.

Outputs: the loss (every rank), the new parameters and optimizer state (in their input placements).
Culprit markers of bugs found in the model's loss sit in `zero.py` (``"zero:loss"``).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randn, seeded
from ._types import Bug, Example
from .zero import LR, MOMENTUM, adam, mlp, sgd_momentum

WD = 0.1
MAX_NORM = 0.5
CLIP_EPS = 1e-6


# ----------------------------------------------------------------------------- the specification


def adamw(p, g, m, v):
    """PyTorch's AdamW: decoupled weight decay of the parameter, then the Adam step."""
    p = p * (1 - LR * WD)  # gg: decay
    return adam(p, g, m, v)


OPTIMIZERS = {"adamw": adamw, "adam": adam, "sgd": sgd_momentum}


def clip_by_global_norm(grads):
    norm = torch.sqrt(sum((g * g).sum() for g in grads))  # gg: clip_norm
    coef = torch.clamp(MAX_NORM / (norm + CLIP_EPS), max=1.0)  # gg: clip_coef
    return [g * coef for g in grads]  # gg: clip


def step(optimizer, params, grads, ms, vs):
    """One optimizer step on every parameter: the new parameters, first and second moments."""
    new = [OPTIMIZERS[optimizer](p, g, m, v) for p, g, m, v in zip(params, grads, ms, vs)]
    return [n[0] for n in new], [n[1] for n in new], [n[2] for n in new]


def train_step(x, y, w1, w2, m1, m2, v1, v2, *, optimizer="adamw", clip=False):
    """Single device: the loss of the whole batch, its gradients (clipped by their global norm), one
    optimizer step."""
    loss = mlp(x, y, w1, w2)
    grads = torch.autograd.grad(loss, [w1, w2])
    if clip:
        grads = clip_by_global_norm(grads)
    new, ms, vs = step(optimizer, [w1.detach(), w2.detach()], grads, [m1, m2], [v1, v2])
    return (loss.detach(), *new, *ms, *vs)


# ---------------------------------------------------------------------------------------- DDP


def _local_grads(x, y, params, micro_batches, bug):
    """Forward and backward of the rank's batch slice, in ``micro_batches`` micro-batches whose
    gradients are summed locally; the loss summed over them for reporting."""
    if micro_batches == 1:
        loss = mlp(x, y, *params)
        return loss.detach(), list(torch.autograd.grad(loss, params))
    grads = [torch.zeros_like(p) for p in params]
    total = torch.zeros((), dtype=x.dtype)
    for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        loss = mlp(xm, ym, *params)
        if bug != "loss_not_scaled":
            loss = loss / micro_batches
        for acc, g in zip(grads, torch.autograd.grad(loss, params)):
            acc += g
        total = total + loss.detach()
    return total, grads


def _all_reduce_grads(grads, reduce):
    world = dist.get_world_size()
    if reduce == "avg":
        for g in grads:
            dist.all_reduce(g, op=dist.ReduceOp.AVG)
    elif reduce == "sum_div":
        for g in grads:
            dist.all_reduce(g)
            g /= world
    elif reduce == "foreach":
        for g in grads:
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
        torch._foreach_div_(grads, world)
    elif reduce == "bucket":  # one flat bucket, as DDP's reducer does
        bucket = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(bucket, op=dist.ReduceOp.AVG)
        grads = [b.view_as(g) for b, g in zip(bucket.split([g.numel() for g in grads]), grads)]
    else:
        raise ValueError(f"unknown reduce {reduce!r}")
    return grads


def _clip_replicated(params, grads, clip):
    if clip == "torch":
        for p, g in zip(params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        return [p.grad for p in params]
    if clip == "manual":
        norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
        coef = (MAX_NORM / (norm + CLIP_EPS)).clamp(max=1.0)
        return [g * coef for g in grads]
    if clip in ("where", "minimum"):
        norm = sum(torch.sum(g * g) for g in grads).sqrt()
        c = MAX_NORM / (norm + CLIP_EPS)
        coef = torch.where(c > 1, 1.0, c) if clip == "where" else torch.minimum(c, torch.ones_like(c))
        return [g * coef for g in grads]
    if clip == "foreach":
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        coef = torch.clamp_max(MAX_NORM / (norm + CLIP_EPS), 1.0)
        torch._foreach_mul_(grads, coef)
        return grads
    if clip is not None:
        raise ValueError(f"unknown clip {clip!r}")
    return grads


def _sgd_foreach(params, grads, bufs):
    """SGD with momentum on the list of parameters with the multi-tensor kernels."""
    bufs = torch._foreach_mul(bufs, MOMENTUM)
    torch._foreach_add_(bufs, grads)
    return torch._foreach_add(params, bufs, alpha=-LR), bufs


def ddp_step(x, y, w1, w2, m1, m2, v1, v2, *, optimizer="adamw", micro_batches=1, clip=None, reduce="avg",
             bug=None):
    """One DDP rank: its batch slice, per-parameter gradients all-reduced (averaged), optionally
    clipped, one optimizer step on the replicated parameters and state."""
    params = [w1, w2]
    loss, grads = _local_grads(x, y, params, micro_batches, bug)
    if bug == "clip_before_all_reduce":  # each rank clips its own gradients
        grads = _clip_replicated(params, grads, clip)
    grads = _all_reduce_grads(grads, reduce)
    if bug != "clip_before_all_reduce":
        grads = _clip_replicated(params, grads, clip)
    if bug == "decay_on_grad":  # Adam's L2 penalty on the gradient instead of AdamW's decoupled decay
        grads = [g + WD * p.detach() for g, p in zip(grads, params)]
        optimizer = "adam"
    if optimizer == "sgd_foreach":
        new, ms = _sgd_foreach([w1.detach(), w2.detach()], grads, [m1, m2])
        vs = [v1, v2]
    else:
        new, ms, vs = step(optimizer, [w1.detach(), w2.detach()], grads, [m1, m2], [v1, v2])
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return (loss, *new, *ms, *vs)


# ------------------------------------------------------------------------------------- ZeRO-1


def _all_gather_rows(shard):
    """The full tensor from every rank's rows (``Shard(0)``)."""
    full = shard.new_empty((shard.shape[0] * dist.get_world_size(), *shard.shape[1:]))
    dist.all_gather_into_tensor(full, shard.contiguous())
    return full


def _rows(t, rank, world):
    """Rank ``rank``'s rows of ``t`` (its ``Shard(0)`` chunk)."""
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def zero1_step(x, y, w1, w2, m1, m2, v1, v2, *, optimizer="adamw", clip=None, bug=None):
    """One ZeRO-1 rank: gradients all-reduced as in DDP; the optimizer state sharded by rows, so each
    rank updates its rows of every parameter, and the updated rows are all-gathered."""
    rank, world = dist.get_rank(), dist.get_world_size()
    params = [w1, w2]
    loss = mlp(x, y, *params)
    grads = list(torch.autograd.grad(loss, params))
    for g in grads:
        dist.all_reduce(g, op=dist.ReduceOp.AVG)
    grads = _clip_replicated(params, grads, clip)
    g_mine = [_rows(g, rank, world) for g in grads]
    p_mine = [_rows(p.detach(), rank, world) for p in params]
    if bug == "decay_wrong_shard":  # decoupled decay written by hand, on the next rank's rows
        p_next = [_rows(p.detach(), (rank + 1) % world, world) for p in params]
        p_mine = [p - LR * WD * q for p, q in zip(p_mine, p_next)]
        new_mine, ms, vs = step("adam", p_mine, g_mine, [m1, m2], [v1, v2])
    else:
        new_mine, ms, vs = step(optimizer, p_mine, g_mine, [m1, m2], [v1, v2])
    new = [_all_gather_rows(n) for n in new_mine]
    loss = loss.detach().clone()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return (loss, *new, *ms, *vs)


# --------------------------------------------------------------------------------- ZeRO-3 / FSDP


class _GatheredMatmul(torch.autograd.Function):
    """``x @ all_gather(shard)``: the forward gathers the weight and frees it; the backward gathers
    it again and reduce-scatters (averages) the weight's gradient to the rank's rows."""

    @staticmethod
    def forward(ctx, x, shard, op):
        ctx.save_for_backward(x, shard)
        ctx.op = op
        return x @ _all_gather_rows(shard)

    @staticmethod
    def backward(ctx, grad):
        x, shard = ctx.saved_tensors
        w = _all_gather_rows(shard)
        g_w = x.transpose(-2, -1) @ grad
        g_mine = torch.empty_like(shard)
        dist.reduce_scatter_tensor(g_mine, g_w.contiguous(), op=ctx.op)
        return grad @ w.t(), g_mine, None


def _clip_sharded(grads, bug):
    """Clip by the global norm of gradients every rank holds a shard of."""
    sq = torch.zeros((), dtype=grads[0].dtype)
    for g in grads:
        sq = sq + g.pow(2).sum()
    if bug != "clip_local_norm":
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    coef = torch.clamp(MAX_NORM / (sq.sqrt() + CLIP_EPS), max=1.0)
    return [g * coef for g in grads]


def fsdp_step(x, y, w1, w2, m1, m2, v1, v2, *, optimizer="adamw", clip=False, manual=False, reduce="avg",
              bug=None):
    """One ZeRO-3 / FSDP rank: parameters sharded by rows. Each layer's weight is all-gathered for
    the forward (with ``manual``: and again in the backward, by a custom autograd function);
    gradients reduce-scattered (averaged); clipped by the global norm of the shards; each rank steps
    its rows with its rows of the optimizer state."""
    world = dist.get_world_size()
    op = dist.ReduceOp.SUM if reduce == "sum_div" or bug == "reduce_scatter_sum" else dist.ReduceOp.AVG
    shards = [w1.detach(), w2.detach()]
    if manual:
        s1, s2 = (s.clone().requires_grad_() for s in shards)
        pred = _GatheredMatmul.apply(torch.tanh(_GatheredMatmul.apply(x, s1, op)), s2, op)
        loss = ((pred - y) ** 2).mean()
        grads = list(torch.autograd.grad(loss, [s1, s2]))
    else:
        full = [_all_gather_rows(s).requires_grad_() for s in shards]
        loss = mlp(x, y, *full)
        grads = []
        for g in torch.autograd.grad(loss, full):
            g_mine = torch.empty((g.shape[0] // world, *g.shape[1:]), dtype=g.dtype)
            dist.reduce_scatter_tensor(g_mine, g, op=op)
            grads.append(g_mine)
    if reduce == "sum_div":
        grads = [g / world for g in grads]
    if clip:
        grads = _clip_sharded(grads, bug)
    if bug == "decay_on_grad":  # Adam's L2 penalty on the gradient instead of AdamW's decoupled decay
        grads = [g + WD * p for g, p in zip(grads, shards)]
        optimizer = "adam"
    new, ms, vs = step(optimizer, shards, grads, [m1, m2], [v1, v2])
    loss = loss.detach().clone()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return (loss, *new, *ms, *vs)


def _inputs(seed, batch, d, h, dtype, device):
    g = seeded(seed)
    x = randn(g, batch, d, dtype=dtype, device=device)
    y = randn(g, batch, d, dtype=dtype, device=device)
    w1 = randn(g, d, h, dtype=dtype, device=device, scale=d ** -0.5).requires_grad_()
    w2 = randn(g, h, d, dtype=dtype, device=device, scale=h ** -0.5).requires_grad_()
    m1, m2 = (randn(g, *w.shape, dtype=dtype, device=device, scale=0.1) for w in (w1, w2))
    v1, v2 = (randn(g, *w.shape, dtype=dtype, device=device, scale=0.1).abs() for w in (w1, w2))
    return x, y, w1, w2, m1, m2, v1, v2


NAMES = ("x", "y", "w1", "w2", "m1", "m2", "v1", "v2")


def make_ddp(world_size: int = 2, bug: str | None = None, *, batch: int = 8, d: int = 4, h: int = 6,
             optimizer: str = "adamw", micro_batches: int = 1, clip: str | None = None, reduce: str = "avg",
             seed: int = 0, dtype=torch.float64, device="cpu", name: str = "ddp") -> Problem:
    check_bug(name, bug, DDP_BUGS)
    return Problem(
        sequential=functools.partial(train_step, optimizer="sgd" if optimizer == "sgd_foreach" else optimizer,
                                     clip=clip is not None),
        distributed=functools.partial(ddp_step, optimizer=optimizer, micro_batches=micro_batches,
                                      clip=clip, reduce=reduce, bug=bug),
        inputs=_inputs(seed, batch, d, h, dtype, device),
        placements=(Shard(0), Shard(0)) + (Replicate(),) * 6,
        world_size=world_size,
        expect=(Replicate(),) * 7,
        name=name if bug is None else f"{name}[{bug}]",
        input_names=NAMES,
    )


def make_zero1(world_size: int = 2, bug: str | None = None, *, batch: int = 8, d: int = 4, h: int = 8,
               optimizer: str = "adamw", clip: str | None = None, seed: int = 0, dtype=torch.float64,
               device="cpu", name: str = "zero1") -> Problem:
    check_bug(name, bug, ZERO1_BUGS)
    return Problem(
        sequential=functools.partial(train_step, optimizer=optimizer, clip=clip is not None),
        distributed=functools.partial(zero1_step, optimizer=optimizer, clip=clip, bug=bug),
        inputs=_inputs(seed, batch, d, h, dtype, device),
        placements=(Shard(0), Shard(0), Replicate(), Replicate()) + (Shard(0),) * 4,
        world_size=world_size,
        expect=(Replicate(),) * 3 + (Shard(0),) * 4,
        name=name if bug is None else f"{name}[{bug}]",
        input_names=NAMES,
    )


def make_fsdp(world_size: int = 2, bug: str | None = None, *, batch: int = 8, d: int = 4, h: int = 8,
              optimizer: str = "adamw", clip: bool = False, manual: bool = False, reduce: str = "avg", seed: int = 0,
              dtype=torch.float64, device="cpu", name: str = "fsdp") -> Problem:
    check_bug(name, bug, FSDP_BUGS)
    return Problem(
        sequential=functools.partial(train_step, optimizer=optimizer, clip=clip),
        distributed=functools.partial(fsdp_step, optimizer=optimizer, clip=clip, manual=manual, reduce=reduce,
                                      bug=bug),
        inputs=_inputs(seed, batch, d, h, dtype, device),
        placements=(Shard(0),) * 8,
        world_size=world_size,
        expect=(Replicate(),) + (Shard(0),) * 6,
        name=name if bug is None else f"{name}[{bug}]",
        input_names=NAMES,
    )


# ------------------------------------------------------------------------------------ registry


def _bugs(*bugs: Bug) -> dict[str, Bug]:
    return {b.name: b for b in bugs}


LOSS_NOT_SCALED = Bug(
    "loss_not_scaled",
    "Gradient accumulation without dividing each micro-batch's loss by the number of micro-batches: "
    "the accumulated gradient (and the reported loss) is that number times too large.",
    "aten.mean", "zero:loss")
DECAY_ON_GRAD = Bug(
    "decay_on_grad",
    "AdamW's weight decay applied to the gradient (Adam's L2 penalty, g + wd * p, then Adam) instead "
    "of to the parameter (p * (1 - lr * wd)): a different optimizer. The decayed parameter is still "
    "held (up to the factor, the rank's own p); the first value that differs is Adam's first moment "
    "of the penalized gradient.",
    "aten.mul", "zero:adam_m")
CLIP_BEFORE_ALL_REDUCE = Bug(
    "clip_before_all_reduce",
    "Each rank clips its own (local) gradients by their norm before the all-reduce: the clip "
    "coefficient is not the one of the global gradient, and differs between the ranks.",
    "aten.mul", "clip_norm")
DECAY_WRONG_SHARD = Bug(
    "decay_wrong_shard",
    "ZeRO-1 with the decoupled weight decay written by hand: each rank decays its rows of the "
    "parameters with the rows of the next rank.",
    "aten.mul", "decay")
REDUCE_SCATTER_SUM = Bug(
    "reduce_scatter_sum",
    "The gradients are reduce-scattered with SUM instead of AVG (no division by the world size): the "
    "step uses world_size times the gradient (held only up to that factor: the first operator that "
    "needs its value is Adam's first moment).",
    "aten.mul", "zero:adam_m")
CLIP_LOCAL_NORM = Bug(
    "clip_local_norm",
    "The gradient norm for clipping is computed from the rank's shard only (the squared norms are "
    "never all-reduced): each rank clips with its own, smaller norm.",
    "aten.sqrt", "clip_norm")

DDP_BUGS = _bugs(LOSS_NOT_SCALED, DECAY_ON_GRAD, CLIP_BEFORE_ALL_REDUCE)
ZERO1_BUGS = _bugs(DECAY_WRONG_SHARD)
FSDP_BUGS = _bugs(REDUCE_SCATTER_SUM, CLIP_LOCAL_NORM, DECAY_ON_GRAD)

make_ddp_adamw = functools.partial(make_ddp, optimizer="adamw", micro_batches=2, name="ddp_adamw")
make_ddp_sgd_clip = functools.partial(make_ddp, optimizer="sgd", clip="torch", reduce="sum_div",
                                      name="ddp_sgd_clip")
make_zero1_adamw = functools.partial(make_zero1, optimizer="adamw", clip="manual", name="zero1_adamw")
make_fsdp_adamw = functools.partial(make_fsdp, optimizer="adamw", manual=True, name="fsdp_adamw")
make_fsdp_clip = functools.partial(make_fsdp, optimizer="adamw", clip=True, name="fsdp_clip")

EXAMPLES = [
    Example("ddp_adamw", "DDP AdamW step: batch sharded, 2 micro-batches accumulated, per-parameter gradient "
            "all-reduce with AVG, decoupled weight decay on replicated parameters.", make_ddp_adamw,
            _bugs(LOSS_NOT_SCALED, DECAY_ON_GRAD), backward=True),
    Example("ddp_sgd_clip", "DDP SGD-with-momentum step: gradients all-reduced with SUM then divided by the "
            "world size, clipped by torch.nn.utils.clip_grad_norm_.", make_ddp_sgd_clip,
            _bugs(CLIP_BEFORE_ALL_REDUCE), backward=True),
    Example("zero1_adamw", "ZeRO-1 AdamW step: gradients all-reduced and clipped, optimizer state sharded by "
            "rows, each rank updates its rows, the parameters all-gathered.", make_zero1_adamw,
            _bugs(DECAY_WRONG_SHARD), backward=True),
    Example("fsdp_adamw", "ZeRO-3 / FSDP AdamW step: parameters sharded by rows, all-gathered per layer in the "
            "forward and again in the backward (custom autograd function), gradients reduce-scattered with "
            "AVG, sharded optimizer state.", make_fsdp_adamw, _bugs(REDUCE_SCATTER_SUM, DECAY_ON_GRAD),
            backward=True),
    Example("fsdp_clip", "ZeRO-3 / FSDP AdamW step with gradient clipping on the shards: local squared norms "
            "all-reduced with SUM, then sqrt, clip coefficient min(1, max_norm / (norm + eps)).", make_fsdp_clip,
            _bugs(CLIP_LOCAL_NORM), backward=True),
]
