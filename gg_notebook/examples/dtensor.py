"""DTensor-native rank programs: the rank builds its ``DeviceMesh`` inside the program (as real code
does), wraps its local shards with ``DTensor.from_local``, lets DTensor's sharding propagation insert
the collectives, and leaves DTensor with ``redistribute`` / ``to_local``.

* ``dtensor_sp_mlp``: a sequence-parallel pre-LayerNorm MLP block on a 1-D mesh (Megatron's SP layout
  spelled with placements). The activations arrive sharded along the sequence (``Shard(1)``); the
  LayerNorm runs on the shard, ``redistribute`` to ``Replicate`` all-gathers the sequence, the
  column- then row-parallel linears leave a ``Partial`` output, and ``redistribute`` to ``Shard(1)``
  reduce-scatters it back onto the sequence before the bias and the residual.
* ``dtensor_tp_dp_train``: one SGD step of a tensor-parallel MLP on a 2-D ``("dp", "tp")`` mesh: the
  parameters are leaf DTensors on the ``tp`` sub-mesh, the loss and backward run in DTensor (the
  ``Partial`` output is reduced before the loss, the gradients come back as ``Shard`` or ``Partial``
  and are redistributed to the parameters' placements), then the gradients and the loss are averaged
  over the ``dp`` sub-mesh's process group.

Bugs are the ones DTensor code meets in practice: a ``Partial`` placement lost across
``to_local``/``from_local`` (the local partial sums re-wrapped as ``Replicate``), a bias added to each
rank's partial sum (re-wrapped as ``Partial``: counted world-size times), gradients summed over the
``dp`` group where the loss is a mean, and the data-parallel average over the whole world (mixing
different tensor-parallel shards).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Layout, Problem

from ._common import check_bug, randn, seeded
from ._types import Bug, Example
from .sp_layernorm_mlp import layernorm_mlp_inputs

LR = 0.1


# ---------------------------------------------------------------------------------------- SP MLP


def sp_mlp(x, ln_w, ln_b, w1, b1, w2, b2):
    """Single-device reference: ``x + mlp(layer_norm(x))``."""
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b)
    a = F.gelu(h @ w1 + b1)
    y = a @ w2
    return y + b2 + x  # gg: sp_output


def sp_mlp_dtensor(x, ln_w, ln_b, w1, b1, w2, b2, *, bug=None):
    """One rank: x [batch, seq/W, hidden] (its sequence shard), w1/b1 column shards, w2 row shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    X = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
    LW, LB, B2 = (DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in (ln_w, ln_b, b2))
    W1 = DTensor.from_local(w1, mesh, [Shard(1)], run_check=False)
    B1 = DTensor.from_local(b1, mesh, [Shard(0)], run_check=False)
    W2 = DTensor.from_local(w2, mesh, [Shard(0)], run_check=False)

    h = F.layer_norm(X, (X.shape[-1],), LW, LB)  # on the sequence shard
    h = h.redistribute(mesh, [Replicate()])  # all-gather the sequence
    a = F.gelu(h @ W1 + B1)  # Shard(2): this rank's ffn columns
    y = a @ W2  # Partial: this rank's share of the row-parallel product
    if bug == "partial_as_replicate":
        y = DTensor.from_local(y.to_local(), mesh, [Replicate()], run_check=False)
    if bug == "bias_on_partial":
        y = DTensor.from_local(y.to_local() + b2, mesh, [Partial()], run_check=False)
        return (y.redistribute(mesh, [Shard(1)]) + X).to_local()
    y = y.redistribute(mesh, [Shard(1)])  # reduce-scatter onto the sequence
    return (y + B2 + X).to_local()


SP_BUGS = {
    b.name: b
    for b in (
        Bug("partial_as_replicate",
            "The row-parallel output's Partial placement is lost: its local partial sums are re-wrapped with "
            "from_local(..., [Replicate()]), so the redistribute to Shard(1) slices instead of reduce-scattering.",
            "aten.add", "sp_output"),
        Bug("bias_on_partial",
            "The output bias is added to each rank's local partial sum, re-wrapped as Partial(): the reduction "
            "then counts the bias world-size times.",
            "aten.add", "sp_output"),
    )
}


def make_sp_mlp(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8,
                hidden: int = 16, ffn: int = 32, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("dtensor_sp_mlp", bug, SP_BUGS)
    return Problem(
        sequential=sp_mlp,
        distributed=functools.partial(sp_mlp_dtensor, bug=bug),
        inputs=layernorm_mlp_inputs((batch, seq, hidden), ffn, seed=seed, dtype=dtype, device=device),
        placements=(Shard(1), Replicate(), Replicate(), Shard(1), Shard(0), Shard(0), Replicate()),
        world_size=world_size,
        expect=(Shard(1),),
        name="dtensor_sp_mlp" if bug is None else f"dtensor_sp_mlp[{bug}]",
        input_names=("x", "ln_w", "ln_b", "w1", "b1", "w2", "b2"),
    )


# ------------------------------------------------------------------------------ TP x DP training


def mlp_sgd_step(x, target, w1, w2):
    """Single-device reference: one SGD step on ``mse(relu(x @ w1) @ w2, target)``."""
    w1 = w1.detach().requires_grad_()
    w2 = w2.detach().requires_grad_()
    loss = F.mse_loss(torch.relu(x @ w1) @ w2, target)  # gg: train_loss
    loss.backward()
    return loss.detach(), w1.detach() - LR * w1.grad, w2.detach() - LR * w2.grad  # gg: train_update


def tp_dp_train_dtensor(x, target, w1, w2, *, dp: int = 2, bug=None):
    """One rank of a ("dp", "tp") mesh: x/target are its dp replica's batch shard; w1 its tp column
    shard, w2 its tp row shard. Returns the dp-averaged loss and the updated local shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (dp, dist.get_world_size() // dp), mesh_dim_names=("dp", "tp"))
    tp = mesh["tp"]
    W1 = DTensor.from_local(w1, tp, [Shard(1)], run_check=False).requires_grad_()
    W2 = DTensor.from_local(w2, tp, [Shard(0)], run_check=False).requires_grad_()
    X = DTensor.from_local(x, tp, [Replicate()], run_check=False)
    T = DTensor.from_local(target, tp, [Replicate()], run_check=False)

    loss = F.mse_loss(torch.relu(X @ W1) @ W2, T)  # the Partial output is reduced before the loss
    loss.backward()
    grads = [p.grad.redistribute(tp, p.placements).to_local() for p in (W1, W2)]

    dp_group = mesh["dp"].get_group()
    if bug == "dp_average_over_world":
        dp_group = None
    op = dist.ReduceOp.SUM if bug == "dp_grad_sum" else dist.ReduceOp.AVG
    for g in grads:
        dist.all_reduce(g, op=op, group=dp_group)
    loss = loss.to_local().detach().clone()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=mesh["dp"].get_group())
    return loss, w1 - LR * grads[0], w2 - LR * grads[1]


TRAIN_BUGS = {
    b.name: b
    for b in (
        Bug("dp_grad_sum",
            "The gradients are summed over the dp group (ReduceOp.SUM) while each replica's loss is a mean over "
            "its own batch shard: the update is dp times too large.",
            "aten.mul", "train_update"),
        Bug("dp_average_over_world",
            "The data-parallel average runs over the whole world (group=None) instead of the dp sub-mesh's group, "
            "averaging different tensor-parallel shards of the gradient together.",
            "aten.mul", "train_update"),
    )
}


def make_tp_dp_train(world_size: int = 4, bug: str | None = None, *, batch: int = 8, hidden: int = 8,
                     ffn: int = 16, dp: int = 2, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("dtensor_tp_dp_train", bug, TRAIN_BUGS)
    if world_size % dp:
        raise ValueError(f"dtensor_tp_dp_train: world_size {world_size} is not a multiple of dp={dp}")
    tp = world_size // dp
    g = seeded(seed)
    x = randn(g, batch, hidden, dtype=dtype, device=device)
    target = randn(g, batch, hidden, dtype=dtype, device=device)
    w1 = randn(g, hidden, ffn, dtype=dtype, device=device, scale=hidden ** -0.5)
    w2 = randn(g, ffn, hidden, dtype=dtype, device=device, scale=ffn ** -0.5)
    # rank r = d * tp + t holds dp replica d's batch rows and tp shard t of each weight
    batch_rows = Layout(lambda a, r, w: a.chunk(dp, dim=0)[r // tp], name=f"dp batch rows (dp={dp})")
    tp_cols = Layout(lambda a, r, w: a.chunk(tp, dim=1)[r % tp], name=f"tp columns (tp={tp})")
    tp_rows = Layout(lambda a, r, w: a.chunk(tp, dim=0)[r % tp], name=f"tp rows (tp={tp})")
    return Problem(
        sequential=mlp_sgd_step,
        distributed=functools.partial(tp_dp_train_dtensor, dp=dp, bug=bug),
        inputs=(x, target, w1, w2),
        placements=(batch_rows, batch_rows, tp_cols, tp_rows),
        world_size=world_size,
        expect=(Replicate(), tp_cols, tp_rows),
        name="dtensor_tp_dp_train" if bug is None else f"dtensor_tp_dp_train[{bug}]",
        input_names=("x", "target", "w1", "w2"),
    )


EXAMPLES = [
    Example("dtensor_sp_mlp",
            "Sequence-parallel pre-LayerNorm MLP block written with DTensor: mesh built in the rank, "
            "from_local shards, redistribute all-gather / reduce-scatter, Partial output.",
            make_sp_mlp, SP_BUGS, runs_on="gloo"),
    Example("dtensor_tp_dp_train",
            "One SGD step of a TP MLP in DTensor on a 2-D (dp, tp) mesh: leaf DTensor parameters, backward "
            "through DTensor, gradients redistributed to the parameters' placements, dp average by process group.",
            make_tp_dp_train, TRAIN_BUGS, backward=True, runs_on="gloo", world_sizes=(4, 8)),
]
