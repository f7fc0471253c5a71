"""Data parallel training step with ZeRO-2 sharding: one verifiable program from batch to updated
weights and optimizer state.

The model's parameters live in one flat buffer (as DeepSpeed and FSDP's flat parameters keep them);
the specification takes one Adam (or SGD with momentum) step on the whole buffer. Each rank gets its
slice of the global batch (``Shard(0)``), computes the gradient of its local mean loss with respect
to the whole buffer, and reduce-scatters it with ``ReduceOp.AVG``: rank r receives the averaged
gradient of its own chunk of the buffer, updates that chunk with its chunk of the optimizer state
(``m``, ``v`` sharded ``Shard(0)``), and the updated chunks are all-gathered into the new buffer. The
loss is averaged over the ranks for reporting.

Outputs: the loss (every rank), the new flat parameters (every rank), the new optimizer state (each
rank its chunk).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randn, seeded
from ._types import Bug, Example

LR, BETA1, BETA2, EPS, STEP = 1e-2, 0.9, 0.999, 1e-8, 3
MOMENTUM = 0.9


def unflatten(flat, d, h):
    w1 = flat[: d * h].view(d, h)
    w2 = flat[d * h:].view(h, d)
    return w1, w2


def mlp(x, y, w1, w2):
    """The model and its loss: a two-layer tanh MLP, mean squared error."""
    return ((torch.tanh(x @ w1) @ w2 - y) ** 2).mean()  # gg: loss


def mlp_loss(x, y, flat, d, h):
    return mlp(x, y, *unflatten(flat, d, h))


def adam(p, g, m, v):
    m = BETA1 * m + (1 - BETA1) * g  # gg: adam_m
    v = BETA2 * v + (1 - BETA2) * g * g
    m_hat = m / (1 - BETA1 ** STEP)
    v_hat = v / (1 - BETA2 ** STEP)
    return p - LR * m_hat / (v_hat.sqrt() + EPS), m, v  # gg: adam_update


def sgd_momentum(p, g, buf, _unused):
    buf = MOMENTUM * buf + g  # gg: momentum
    return p - LR * buf, buf, _unused


OPTIMIZERS = {"adam": adam, "sgd": sgd_momentum}


def train_step(x, y, flat, m, v, *, d, h, optimizer="adam"):
    """Single-device reference: loss, gradient, one optimizer step on the whole flat buffer."""
    loss = mlp_loss(x, y, flat, d, h)
    (g,) = torch.autograd.grad(loss, [flat])
    new, m, v = OPTIMIZERS[optimizer](flat.detach(), g, m, v)
    return loss.detach(), new, m, v


def zero2_step(x, y, flat, m, v, *, d, h, optimizer="adam", bug=None):
    """One data-parallel rank with ZeRO-2: its batch slice; gradients reduce-scattered (averaged);
    its chunk of the parameters and optimizer state updated; the chunks all-gathered."""
    rank, world = dist.get_rank(), dist.get_world_size()
    loss = mlp_loss(x, y, flat, d, h)
    (g,) = torch.autograd.grad(loss, [flat])
    chunk = flat.numel() // world
    g_mine = torch.empty(chunk, dtype=g.dtype)
    op = dist.ReduceOp.SUM if bug == "reduce_scatter_sum" else dist.ReduceOp.AVG
    dist.reduce_scatter_tensor(g_mine, g, op=op)
    p_mine = flat.detach()[rank * chunk:(rank + 1) * chunk]
    if bug == "state_misaligned":  # the state chunk of the next rank
        p_mine = flat.detach()[((rank + 1) % world) * chunk:((rank + 1) % world + 1) * chunk]
    new_mine, m, v = OPTIMIZERS[optimizer](p_mine, g_mine, m, v)
    new = torch.empty_like(flat.detach())
    dist.all_gather_into_tensor(new, new_mine)
    loss = loss.detach().clone()
    if bug != "loss_not_averaged":
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss, new, m, v


BUGS = {
    b.name: b
    for b in (
        Bug("reduce_scatter_sum",
            "The gradients are reduce-scattered with SUM instead of AVG: every rank's local mean loss is "
            "already a mean, so the update uses world_size times the gradient.", "aten.mul", "adam_m"),
        Bug("state_misaligned",
            "Each rank updates the parameter chunk of the next rank with its own chunk of the gradient and "
            "optimizer state: the state is misaligned with its shard.", "aten.sub", "adam_update"),
        Bug("loss_not_averaged",
            "The reported loss is the rank's local mean, never averaged over the data-parallel ranks.",
            "aten.mean", "loss"),
    )
}


def make(world_size: int = 2, bug: str | None = None, *, batch: int = 8, d: int = 4, h: int = 6,
         optimizer: str = "adam", seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("zero_adam", bug, BUGS)
    g = seeded(seed)
    x = randn(g, batch, d, dtype=dtype, device=device)
    y = randn(g, batch, d, dtype=dtype, device=device)
    n = 2 * d * h
    flat = randn(g, n, dtype=dtype, device=device, scale=d ** -0.5).requires_grad_()
    m = randn(g, n, dtype=dtype, device=device, scale=0.1)
    v = randn(g, n, dtype=dtype, device=device, scale=0.1).abs()
    return Problem(
        sequential=functools.partial(train_step, d=d, h=h, optimizer=optimizer),
        distributed=functools.partial(zero2_step, d=d, h=h, optimizer=optimizer, bug=bug),
        inputs=(x, y, flat, m, v),
        placements=(Shard(0), Shard(0), Replicate(), Shard(0), Shard(0)),
        world_size=world_size,
        expect=(Replicate(), Replicate(), Shard(0), Shard(0)),
        name="zero_adam" if bug is None else f"zero_adam[{bug}]",
        input_names=("x", "y", "flat", "m", "v"),
    )


EXAMPLES = [
    Example("zero_adam", "Data parallel + ZeRO-2 Adam step on a flat parameter buffer: batch sharded, gradients "
            "reduce-scattered with AVG, sharded optimizer state, updated chunks all-gathered.", make, BUGS,
            backward=True),
]
