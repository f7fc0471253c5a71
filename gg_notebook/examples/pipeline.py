"""Pipeline parallel training step: GPipe and 1F1B over micro-batches, forward and backward.

The model is a stack of ``W`` stages (``tanh(h @ w[s] + b[s])``), stage ``s`` on rank ``s``: the
stacked weights are sharded along the stage dim (``Shard(0)``), so rank ``s`` holds exactly its
stage. The batch is cut into ``M`` micro-batches. Activations travel forward with ``send``/``recv``
(each stage detaches what it receives and marks it as requiring grad: the stage boundary), the
last stage computes the loss of each micro-batch scaled by ``1/M``, and the gradients of the
activations travel back; each stage accumulates its weights' gradients over the micro-batches.

* GPipe: all forwards, then all backwards (blocking ``dist.send``/``dist.recv``).
* 1F1B: after ``W - s - 1`` warm-up forwards, stage ``s`` alternates one forward and one backward;
  the steady-state exchanges go both ways at once, so they are posted with
  ``dist.batch_isend_irecv`` (blocking calls there deadlock).

Outputs: the loss (held by the last stage: ``gg.OnRank(W - 1)``) and the gradients of the stacked
weights and biases (``Shard(0)``: each stage its own).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import OnRank, Problem

from ._common import check_bug, randn, seeded
from ._types import Bug, Example


def stage(h, w, b):
    return torch.tanh(h @ w + b)  # gg: stage


def stacked_mlp(x, target, w, b):
    """Single-device reference: every stage in turn, mean-squared-error loss, and its gradients."""
    h = x
    for s in range(w.shape[0]):
        h = stage(h, w[s], b[s])
    loss = ((h - target) ** 2).mean()  # gg: loss
    gw, gb = torch.autograd.grad(loss, [w, b])
    return loss, gw, gb


class _Stage:
    """What one rank keeps per micro-batch between its forward and its backward."""

    def __init__(self, x_in, out):
        self.x_in, self.out = x_in, out


def _forward(m, xs, ts, w, b, rank, world, M, bug):
    if rank == 0:
        h = xs[m]
    else:
        h = torch.empty(xs[m].shape[0], w.shape[-1], dtype=w.dtype)
        dist.recv(h, src=rank - 1)
        h = h.detach().requires_grad_(True)
    out = stage(h, w[0], b[0])
    if rank < world - 1:
        dist.send(out.detach(), dst=rank + 1)
    loss = None
    if rank == world - 1:
        loss = F.mse_loss(out, ts[m])
        if bug != "loss_not_scaled":
            loss = loss / M
    return _Stage(h, out), loss


def _backward(st, loss, w, b, rank, world):
    wrt = [w, b] if rank == 0 else [st.x_in, w, b]
    if rank == world - 1:
        grads = torch.autograd.grad(loss, wrt)
    else:
        g = torch.empty_like(st.out)
        dist.recv(g, src=rank + 1)
        grads = torch.autograd.grad(st.out, wrt, grad_outputs=g)
    if rank > 0:
        dist.send(grads[0], dst=rank - 1)
        grads = grads[1:]
    return grads


def gpipe(x, target, w, b, *, micro_batches=2, bug=None):
    """One rank (= one stage) of a GPipe training step: all forwards, then all backwards."""
    rank, world = dist.get_rank(), dist.get_world_size()
    M = micro_batches
    xs, ts = x.chunk(M), target.chunk(M)
    saved, losses = [], []
    for m in range(M):
        st, loss = _forward(m, xs, ts, w, b, rank, world, M, bug)
        saved.append(st)
        losses.append(loss)
    gw, gb = torch.zeros_like(w), torch.zeros_like(b)
    order = range(M)
    if bug == "backward_order_mismatch" and rank == world - 1:
        order = reversed(range(M))  # the last stage sends gradients in the other order
    for m in order:
        dw, db = _backward(saved[m], losses[m], w, b, rank, world)
        if bug == "grad_not_accumulated":
            gw, gb = dw, db
        else:
            gw, gb = gw + dw, gb + db
    total = torch.stack(losses).sum() if rank == world - 1 else torch.zeros(())
    return total, gw, gb


def one_f_one_b(x, target, w, b, *, micro_batches=4, bug=None):
    """One rank of a 1F1B training step; the steady state posts its sends and receives together."""
    rank, world = dist.get_rank(), dist.get_world_size()
    M = micro_batches
    xs, ts = x.chunk(M), target.chunk(M)
    mb = xs[0].shape[0]
    d = w.shape[-1]
    warmup = min(world - rank - 1, M)
    saved: dict[int, _Stage] = {}
    losses: dict[int, torch.Tensor] = {}
    gw, gb = torch.zeros_like(w), torch.zeros_like(b)

    def run_stage(m, h):
        out = stage(h, w[0], b[0])
        saved[m] = _Stage(h, out)
        if rank == world - 1:
            loss = F.mse_loss(out, ts[m])
            losses[m] = loss if bug == "loss_not_scaled" else loss / M
        return out

    def grads_of(m, g_out):
        st = saved.pop(m)
        wrt = [w, b] if rank == 0 else [st.x_in, w, b]
        if rank == world - 1:
            grads = torch.autograd.grad(losses[m], wrt)
        else:
            grads = torch.autograd.grad(st.out, wrt, grad_outputs=g_out)
        return (None, *grads) if rank == 0 else grads

    def exchange(send_next=None, recv_next=False, send_prev=None, recv_prev=False):
        ops, got_next, got_prev = [], None, None
        if recv_prev and rank > 0:
            got_prev = torch.empty(mb, d, dtype=w.dtype)
            ops.append(dist.P2POp(dist.irecv, got_prev, rank - 1))
        if send_prev is not None and rank > 0:
            ops.append(dist.P2POp(dist.isend, send_prev, rank - 1))
        if send_next is not None and rank < world - 1:
            ops.append(dist.P2POp(dist.isend, send_next, rank + 1))
        if recv_next and rank < world - 1:
            got_next = torch.empty(mb, d, dtype=w.dtype)
            ops.append(dist.P2POp(dist.irecv, got_next, rank + 1))
        for req in (dist.batch_isend_irecv(ops) if ops else []):
            req.wait()
        return got_next, got_prev

    def input_of(m, received):
        if rank == 0:
            return xs[m]
        return received.detach().requires_grad_(True)

    fwd, bwd = 0, 0
    _, h = exchange(recv_prev=True)
    for _ in range(warmup):  # warm-up forwards
        out = run_stage(fwd, input_of(fwd, h))
        fwd += 1
        _, h = exchange(send_next=out.detach(), recv_prev=fwd < M)
    while fwd < M:  # steady state: one forward, then one backward
        out = run_stage(fwd, input_of(fwd, h))
        fwd += 1
        g, _ = exchange(send_next=out.detach(), recv_next=True)
        gx, dw, db = grads_of(bwd, g)
        bwd += 1
        gw, gb = (dw, db) if bug == "grad_not_accumulated" else (gw + dw, gb + db)
        _, h = exchange(send_prev=gx, recv_prev=fwd < M)
    while bwd < M:  # cool-down backwards
        g, _ = exchange(recv_next=True)
        gx, dw, db = grads_of(bwd, g)
        bwd += 1
        gw, gb = (dw, db) if bug == "grad_not_accumulated" else (gw + dw, gb + db)
        exchange(send_prev=gx)
    total = torch.stack([losses[m] for m in range(M)]).sum() if rank == world - 1 else torch.zeros(())
    return total, gw, gb


BUGS = {
    b.name: b
    for b in (
        Bug("loss_not_scaled",
            "Each micro-batch's loss is not divided by the number of micro-batches: the loss and every "
            "gradient come out M times too large.", "aten.mean", "loss"),
        Bug("grad_not_accumulated",
            "Each stage keeps only the last micro-batch's weight gradients instead of summing them.",
            "aten.sum", "stage"),
    )
}
GPIPE_BUGS = dict(BUGS, backward_order_mismatch=Bug(
    "backward_order_mismatch",
    "The last stage sends the micro-batches' activation gradients back in reverse order while the other "
    "stages backpropagate in forward order: each stage differentiates one micro-batch with another's gradient.",
    "aten.tanh_backward", "stage"))


def _make(schedule, name, default_m, world_size: int = 2, bug: str | None = None, *, batch: int = 8, hidden: int = 6,
          micro_batches: int | None = None, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug(name, bug, GPIPE_BUGS if schedule is gpipe else BUGS)
    M = micro_batches or default_m
    g = seeded(seed)
    x = randn(g, batch, hidden, dtype=dtype, device=device)
    target = randn(g, batch, hidden, dtype=dtype, device=device)
    w = randn(g, world_size, hidden, hidden, dtype=dtype, device=device, scale=hidden ** -0.5).requires_grad_()
    b = randn(g, world_size, hidden, dtype=dtype, device=device, scale=0.1).requires_grad_()
    return Problem(
        sequential=stacked_mlp,
        distributed=functools.partial(schedule, micro_batches=M, bug=bug),
        inputs=(x, target, w, b),
        placements=(Replicate(), Replicate(), Shard(0), Shard(0)),
        world_size=world_size,
        expect=(OnRank(world_size - 1), Shard(0), Shard(0)),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("x", "target", "w", "b"),
    )


make_gpipe = functools.partial(_make, gpipe, "pipeline_gpipe", 2)
make_1f1b = functools.partial(_make, one_f_one_b, "pipeline_1f1b", 4)

EXAMPLES = [
    Example("pipeline_gpipe", "Pipeline parallel GPipe step: stage s on rank s, micro-batches, send/recv of "
            "activations and their gradients, loss on the last stage, gradients accumulated.", make_gpipe,
            GPIPE_BUGS, backward=True, runs_on="gloo"),
    Example("pipeline_1f1b", "Pipeline parallel 1F1B step: warm-up forwards, one forward / one backward with "
            "batch_isend_irecv in the steady state, cool-down backwards.", make_1f1b, BUGS, backward=True,
            runs_on="gloo"),
]
