"""2-D meshes: tensor parallel x data parallel, data x context parallel, tensor parallel x pipeline; and a 3-D
mesh: data x pipeline x tensor parallel.

The ranks form a grid (``rank = outer * inner_size + inner``, DeviceMesh's row-major order) and every
program builds one process group per row and per column of it, as real code must: every rank calls
``dist.new_group(ranks)`` for *every* group, in the same order, and keeps the ones it belongs to
(or ``dist.new_subgroups`` / ``new_subgroups_by_enumeration``, or a DeviceMesh built inside the rank
function: ``init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))``, ``mesh["tp"].get_group()``).

* ``mesh_tp_dp`` (and the spellings ``mesh_tp_dp_subgroups``, ``mesh_tp_dp_device_mesh``): one SGD
  training step of a vocab-parallel embedding followed by a Megatron column/row tensor-parallel MLP
  inside each TP group, data parallel across them. The batch is sharded over DP and replicated over
  TP; the weights are sharded over TP and replicated over DP (`gg.Layout` placements on the mesh).
  The row-parallel output is all-reduced in the TP group (and the embedding output, whose vocabulary
  range comes from the rank *in the TP group*); the gradients are summed over the DP group and
  divided by the DP size; the loss is averaged over the DP group.
* ``mesh_dp_cp``: causal attention with the sequence split over a context-parallel group (keys and
  values all-gathered in the CP group, the causal mask offset by the query shard's global position),
  data parallel across; the mean of the squared output reduced over the CP and the DP groups.
* ``mesh_tp_pp``: the gradients of a GPipe step (two micro-batches, all forwards then all backwards)
  over two pipeline stages, each tensor parallel over ``W/2`` ranks (Megatron's column/row-parallel
  block); the activation and its gradient travel between stages as Megatron's scatter-gather
  optimization sends them: each TP rank sends its ``1/tp`` slice to the rank with the same TP index
  in the other stage, which all-gathers the slices in its TP group (the gathered slices of the
  stage's TP all-reduce are that all-reduce again: relations/cat_sums.py).
* ``mesh_dp_pp_tp``: a training step on a 3-D ``dp x pp x tp`` mesh (DP 2 x PP 2 x TP ``W/4``, ``rank =
  (d * pp + p) * tp + t``): every rank builds every TP group, PP pair and DP group with ``new_group`` (or
  ``init_device_mesh("cpu", (2, 2, tp), mesh_dim_names=("dp", "pp", "tp"))``); each DP replica runs the
  TP x PP GPipe step on its half of the batch, the gradients are averaged over the DP group, SGD step.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.adapters.layouts import mesh_layout
from gg_notebook.problem import OnRank, Problem

from ._common import check_bug, randint, randn, seeded
from ._types import Bug, Example

LR = 0.1


# ----------------------------------------------------------------------------------- process groups


def mesh_groups(outer: int, inner: int):
    """``(inner_group, outer_group)`` of this rank on an ``outer x inner`` grid, with ``new_group``:
    the inner groups are rows (consecutive ranks), the outer groups columns (stride ``inner``). Every
    rank creates every group, in the same order."""
    rank = dist.get_rank()
    inner_group = outer_group = None
    for o in range(outer):
        ranks = [o * inner + i for i in range(inner)]
        group = dist.new_group(ranks)
        if rank in ranks:
            inner_group = group
    for i in range(inner):
        ranks = [o * inner + i for o in range(outer)]
        group = dist.new_group(ranks)
        if rank in ranks:
            outer_group = group
    return inner_group, outer_group


def mesh_subgroups(outer: int, inner: int):
    """The same groups with ``new_subgroups`` (consecutive blocks) and ``new_subgroups_by_enumeration``."""
    inner_group, _ = dist.new_subgroups(group_size=inner)
    outer_group, _ = dist.new_subgroups_by_enumeration(
        [list(range(i, outer * inner, inner)) for i in range(inner)])
    return inner_group, outer_group


def mesh_device_mesh(outer: int, inner: int, names=("dp", "tp")):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (outer, inner), mesh_dim_names=names)
    return mesh[names[1]].get_group(), mesh[names[0]].get_group()


GROUPS = {"new_group": mesh_groups, "subgroups": mesh_subgroups, "device_mesh": mesh_device_mesh}


def grid(outer: int, inner: int):
    return [[o * inner + i for i in range(inner)] for o in range(outer)]


# ------------------------------------------------------------- Megatron's f and g on a given group


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient in the TP group backward (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce in the TP group forward, identity backward (Megatron's ``g``)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ----------------------------------------------------------------------------- 1. TP x DP training


def model_loss(ids, y, wte, w1, w2):
    e = F.embedding(ids, wte)  # gg: embedding
    h = torch.tanh(e @ w1)
    out = h @ w2  # gg: row_parallel
    return F.mse_loss(out, y)  # gg: loss


def train_step(ids, y, wte, w1, w2):
    """Single-device reference: the loss and one SGD step on every weight."""
    loss = model_loss(ids, y, wte, w1, w2)
    grads = torch.autograd.grad(loss, [wte, w1, w2])
    return (loss.detach(), *(p.detach() - LR * g for p, g in zip((wte, w1, w2), grads)))  # gg: update


def tp_dp_step(ids, y, wte, w1, w2, *, tp, groups="new_group", bug=None):
    """One rank of the TP x DP step: ``ids``/``y`` its DP replica's batch slice, ``wte`` its TP rank's
    vocabulary rows, ``w1`` its columns, ``w2`` its rows."""
    dp = dist.get_world_size() // tp
    tp_group, dp_group = GROUPS[groups](dp, tp)
    tp_rank = dist.get_rank() if bug == "global_rank_shard" else dist.get_rank(tp_group)
    # vocab-parallel embedding: this rank's rows serve ids [start, start + V/tp)
    per = wte.shape[0]
    start = tp_rank * per
    foreign = (ids < start) | (ids >= start + per)
    local_ids = (ids - start).masked_fill(foreign, 0)
    e = F.embedding(local_ids, wte).masked_fill(foreign.unsqueeze(-1), 0.0)
    e = _ReduceFromTP.apply(e, tp_group)
    # column-parallel w1, row-parallel w2, all-reduce of the partial sums in the TP group
    h = torch.tanh(_CopyToTP.apply(e, tp_group) @ w1)
    out = _ReduceFromTP.apply(h @ w2, None if bug == "tp_allreduce_world" else tp_group)
    loss = F.mse_loss(out, y)
    grads = torch.autograd.grad(loss, [wte, w1, w2])
    new = []
    for p, g in zip((wte, w1, w2), grads):
        if bug == "dp_grad_tp_group":
            dist.all_reduce(g, group=tp_group)
        else:
            dist.all_reduce(g, group=dp_group)
        if bug != "dp_grad_sum":
            g = g / dp
        new.append(p.detach() - LR * g)
    loss = loss.detach().clone()
    dist.all_reduce(loss, group=dp_group)
    return (loss / dp, *new)


TP_DP_BUGS = {
    b.name: b
    for b in (
        Bug("tp_allreduce_world",
            "The row-parallel partial sums are all-reduced over the default (world) group instead of the TP "
            "group: each rank adds the partial outputs of the other data-parallel replicas' batches.",
            "aten.sub", "loss"),
        Bug("dp_grad_sum",
            "The gradients are summed over the DP group but never divided by its size: the step is dp times "
            "too large.", "aten.mul", "update"),
        Bug("dp_grad_tp_group",
            "The gradients are averaged over the TP group instead of the DP group: each rank mixes its "
            "shard's gradient with the other shards' and never sees the other replicas' batches (the "
            "embedding gradient is the first the update needs averaged over the replicas).",
            "aten.embedding_dense_backward", "embedding"),
        Bug("global_rank_shard",
            "The vocabulary range of the embedding shard is computed from the global rank "
            "(dist.get_rank()) instead of the rank in the TP group: every replica but the first serves ids "
            "beyond its rows and its tokens embed to zero.", "aten.embedding", "embedding"),
    )
}


def make_tp_dp(world_size: int = 4, bug: str | None = None, *, groups: str = "new_group", tp: int = 2,
               batch: int | None = None, seq: int | None = None, vocab: int = 8, hidden: int = 4, ffn: int = 8,
               seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    name = {"new_group": "mesh_tp_dp", "subgroups": "mesh_tp_dp_subgroups",
            "device_mesh": "mesh_tp_dp_device_mesh"}[groups]
    check_bug(name, bug, TP_DP_BUGS)
    if world_size % tp:
        raise ValueError(f"{name}: world_size {world_size} is not a multiple of tp={tp}")
    dp = world_size // tp
    batch = 2 * dp if batch is None else batch
    g = seeded(seed)
    ids = randint(g, vocab, *((batch,) if seq is None else (batch, seq)), device=device)
    y = randn(g, *ids.shape, hidden, dtype=dtype, device=device)
    wte = randn(g, vocab, hidden, dtype=dtype, device=device).requires_grad_()
    w1 = randn(g, hidden, ffn, dtype=dtype, device=device, scale=hidden ** -0.5).requires_grad_()
    w2 = randn(g, ffn, hidden, dtype=dtype, device=device, scale=ffn ** -0.5).requires_grad_()
    mesh = grid(dp, tp)
    batch_pl = mesh_layout(mesh, [Shard(0), Replicate()])
    rows, cols = mesh_layout(mesh, [Replicate(), Shard(0)]), mesh_layout(mesh, [Replicate(), Shard(1)])
    return Problem(
        sequential=train_step,
        distributed=functools.partial(tp_dp_step, tp=tp, groups=groups, bug=bug),
        inputs=(ids, y, wte, w1, w2),
        placements=(batch_pl, batch_pl, rows, cols, rows),
        world_size=world_size,
        expect=(Replicate(), rows, cols, rows),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("ids", "y", "wte", "w1", "w2"),
    )



# ------------------------------------------------------------------------------- 2. TP x PP training


def block(h, w1, w2):
    return torch.tanh(h @ w1) @ w2  # gg: block


def two_stage_loss(x, y, w1, w2):
    h = x
    for s in range(w1.shape[0]):
        h = block(h, w1[s], w2[s])  # gg: pp_stage
    return F.mse_loss(h, y)  # gg: pp_loss


def pp_grads(x, y, w1, w2):
    """Single-device reference: the loss of both stages in turn and its gradients."""
    loss = two_stage_loss(x, y, w1, w2)
    g1, g2 = torch.autograd.grad(loss, [w1, w2])
    return loss.detach(), g1, g2


def _tp_block(h, w1, w2, tp_group, reduce=True):
    partial = torch.tanh(_CopyToTP.apply(h, tp_group) @ w1) @ w2
    return _ReduceFromTP.apply(partial, tp_group) if reduce else partial


def _send_scattered(t, peer, tp_rank, tp):
    """Megatron's scatter-gather p2p: send only this TP rank's 1/tp slice of the (replicated) tensor."""
    flat = t.detach().reshape(-1)
    n = flat.numel() // tp
    dist.send(flat[tp_rank * n:(tp_rank + 1) * n].clone(), dst=peer)


def _recv_gathered(shape, dtype, peer, tp, tp_group):
    piece = torch.empty(math.prod(shape) // tp, dtype=dtype)
    dist.recv(piece, src=peer)
    whole = torch.empty(math.prod(shape), dtype=dtype)
    dist.all_gather_into_tensor(whole, piece, group=tp_group)
    return whole.view(shape)


def _gpipe_tp(x, y, w1, w2, *, tp_group, tp_rank, tp, stage, pp, peer_in, micro_batches=2, bug=None):
    """GPipe over ``pp`` stages whose ranks are tensor parallel in ``tp_group`` (this rank: TP index
    ``tp_rank`` of stage ``stage``; ``peer_in(s)`` the global rank of stage ``s`` with this TP index).
    Returns the summed micro-batch losses (on the last stage; zero elsewhere) and this rank's gradients."""
    M = micro_batches
    shape = (x.shape[0] // M,) + tuple(x.shape[1:-1]) + (w2.shape[-1],)
    saved, losses = [], []
    for m in range(M):  # all forwards
        if stage == 0:
            h = x.chunk(M)[m]
        else:
            h = _recv_gathered(shape, x.dtype, peer_in(stage - 1), tp, tp_group).requires_grad_(True)
        # (bug skip_tp_allreduce: the stage's partial sums go to the next stage un-reduced)
        out = _tp_block(h, w1[0], w2[0], tp_group, reduce=not (bug == "skip_tp_allreduce" and stage < pp - 1))
        if stage < pp - 1:
            _send_scattered(out, peer_in(stage + 1), tp_rank, tp)
            losses.append(None)
        else:
            losses.append(F.mse_loss(out, y.chunk(M)[m]) / M)
        saved.append((h, out))
    gw1, gw2 = torch.zeros_like(w1), torch.zeros_like(w2)
    for m in range(M):  # all backwards
        h, out = saved[m]
        wrt = [w1, w2] if stage == 0 else [h, w1, w2]
        if stage == pp - 1:
            grads = torch.autograd.grad(losses[m], wrt)
        else:
            g = _recv_gathered(shape, x.dtype, peer_in(stage + 1), tp, tp_group)
            grads = torch.autograd.grad(out, wrt, grad_outputs=g)
        if stage > 0:
            _send_scattered(grads[0], peer_in(stage - 1), tp_rank, tp)
            grads = grads[1:]
        gw1, gw2 = gw1 + grads[0], gw2 + grads[1]
    total = torch.stack(losses).sum() if stage == pp - 1 else torch.zeros((), dtype=x.dtype)
    return total, gw1, gw2


def tp_pp_step(x, y, w1, w2, *, tp, micro_batches=2, bug=None):
    """One rank of a GPipe step over two pipeline stages, each tensor parallel over ``tp`` ranks:
    ``w1``/``w2`` hold this rank's stage (dim 0) and its TP columns / rows of that stage."""
    pp = dist.get_world_size() // tp
    tp_group, _pp_group = mesh_groups(pp, tp)
    rank, tp_rank = dist.get_rank(), dist.get_rank(tp_group)
    stage = rank // tp

    def peer_in(s):  # the rank of stage s with this rank's TP index
        ranks = [s * tp + t for t in range(tp)]
        if bug == "send_wrong_peer":
            ranks = ranks[::-1]  # the stage's ranks listed in the wrong order, on both sides
        return ranks[tp_rank]

    return _gpipe_tp(x, y, w1, w2, tp_group=tp_group, tp_rank=tp_rank, tp=tp, stage=stage, pp=pp,
                     peer_in=peer_in, micro_batches=micro_batches, bug=bug)


TP_PP_BUGS = {
    b.name: b
    for b in (
        Bug("send_wrong_peer",
            "Each stage pairs its TP ranks with the next stage's in the wrong order (the peer table is "
            "reversed on both sides, so nothing hangs): every rank of the receiving stage gets another TP "
            "rank's slice, and the all-gather assembles the activation with its slices swapped.",
            "aten.mm", "block"),
        Bug("skip_tp_allreduce",
            "The first stage sends its row-parallel partial sums to the next stage without the TP all-reduce: "
            "each TP rank sends its slice of its own partial product, so the next stage gathers a mix of "
            "the TP ranks' partial sums instead of their sum.",
            "aten.mm", "block"),
    )
}


def make_tp_pp(world_size: int = 4, bug: str | None = None, *, batch: int = 4, hidden: int = 4, ffn: int = 8,
               micro_batches: int = 2, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("mesh_tp_pp", bug, TP_PP_BUGS)
    pp = 2
    if world_size % pp:
        raise ValueError(f"mesh_tp_pp: two pipeline stages need an even world size, not {world_size}")
    tp = world_size // pp
    g = seeded(seed)
    x = randn(g, batch, hidden, dtype=dtype, device=device)
    y = randn(g, batch, hidden, dtype=dtype, device=device)
    w1 = randn(g, pp, hidden, ffn, dtype=dtype, device=device, scale=hidden ** -0.5).requires_grad_()
    w2 = randn(g, pp, ffn, hidden, dtype=dtype, device=device, scale=ffn ** -0.5).requires_grad_()
    mesh = grid(pp, tp)
    cols, rows = mesh_layout(mesh, [Shard(0), Shard(2)]), mesh_layout(mesh, [Shard(0), Shard(1)])
    return Problem(
        sequential=pp_grads,
        distributed=functools.partial(tp_pp_step, tp=tp, micro_batches=micro_batches, bug=bug),
        inputs=(x, y, w1, w2),
        placements=(Replicate(), Replicate(), cols, rows),
        world_size=world_size,
        expect=(OnRank(world_size - 1), cols, rows),
        name="mesh_tp_pp" if bug is None else f"mesh_tp_pp[{bug}]",
        input_names=("x", "y", "w1", "w2"),
    )



# ------------------------------------------------------------------ 3. DP x PP x TP training (3-D)


def gpipe_sgd_step(x, y, w1, w2):
    """Single-device reference: the loss of both stages over the whole batch and one SGD step."""
    loss, g1, g2 = pp_grads(x, y, w1, w2)
    return loss, w1.detach() - LR * g1, w2.detach() - LR * g2  # gg: dp_update


def mesh3_groups(dp: int, pp: int, tp: int):
    """``(tp_group, pp_group, dp_group)`` of this rank on a ``dp x pp x tp`` grid (``rank = (d * pp + p) * tp
    + t``, DeviceMesh's row-major order), with ``new_group``: every rank creates every TP group, then every
    PP pair, then every DP group, and keeps its own."""
    rank = dist.get_rank()
    at = lambda d, p, t: (d * pp + p) * tp + t  # noqa: E731
    tp_ranks = [[at(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)]
    pp_ranks = [[at(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    dp_ranks = [[at(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)]
    mine = []
    for family in (tp_ranks, pp_ranks, dp_ranks):
        for ranks in family:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine.append(group)
    tp_group, pp_group, dp_group = mine
    return tp_group, pp_group, dp_group


def mesh3_device_mesh(dp: int, pp: int, tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
    return mesh["tp"].get_group(), mesh["pp"].get_group(), mesh["dp"].get_group()


GROUPS_3D = {"new_group": mesh3_groups, "device_mesh": mesh3_device_mesh}


def dp_pp_tp_step(x, y, w1, w2, *, dp, pp, tp, groups="new_group", micro_batches=2, bug=None):
    """One rank of a DP x PP x TP training step: ``x``/``y`` its DP replica's half of the batch, ``w1``/``w2``
    its stage (dim 0) and TP columns / rows. Each replica runs the TP x PP GPipe step; the gradients (and the
    last stage's loss) are averaged over the DP group; SGD step."""
    tp_group, pp_group, dp_group = GROUPS_3D[groups](dp, pp, tp)
    rank, tp_rank = dist.get_rank(), dist.get_rank(tp_group)
    replica, stage = rank // (pp * tp), rank // tp % pp

    def peer_in(s):  # the rank of stage s in this replica with this rank's TP index
        return (replica * pp + s) * tp + tp_rank

    loss, gw1, gw2 = _gpipe_tp(x, y, w1, w2, tp_group=tp_group, tp_rank=tp_rank, tp=tp, stage=stage, pp=pp,
                               peer_in=peer_in, micro_batches=micro_batches)
    avg_group = {"dp_grad_pp_group": pp_group, "dp_grad_tp_group": tp_group}.get(bug, dp_group)
    new = []
    for p, g in ((w1, gw1), (w2, gw2)):
        dist.all_reduce(g, group=avg_group)
        if bug != "dp_grad_sum":
            g = g / dp
        new.append(p.detach() - LR * g)
    dist.all_reduce(loss, group=dp_group)
    return (loss / dp, *new)


DP_PP_TP_BUGS = {
    b.name: b
    for b in (
        Bug("dp_grad_pp_group",
            "The gradients are averaged over the pipeline pair (this TP index in both stages of the replica) "
            "instead of the DP group: each rank adds the other stage's gradient shard to its own and never "
            "sees the other replica's half of the batch (blamed on the first gradient the update needs whole: "
            "w1's, the sum of its two stages' slices).",
            "aten.add", "pp_stage"),
        Bug("dp_grad_tp_group",
            "The gradients are averaged over the TP group instead of the DP group: each rank mixes its "
            "column/row shard's gradient with its TP peer's and never sees the other replica's half of the batch "
            "(blamed on w1's gradient, as dp_grad_pp_group).",
            "aten.add", "pp_stage"),
        Bug("dp_grad_sum",
            "The gradients are summed over the DP group but never divided by its size: the step is dp times "
            "too large.", "aten.mul", "dp_update"),
    )
}


def make_dp_pp_tp(world_size: int = 8, bug: str | None = None, *, groups: str = "new_group", batch: int = 8,
                  hidden: int = 4, ffn: int = 8, micro_batches: int = 2, seed: int = 0, dtype=torch.float64,
                  device="cpu") -> Problem:
    name = {"new_group": "mesh_dp_pp_tp", "device_mesh": "mesh_dp_pp_tp_device_mesh"}[groups]
    check_bug(name, bug, DP_PP_TP_BUGS)
    dp, pp = 2, 2
    if world_size % (dp * pp):
        raise ValueError(f"{name}: a DP 2 x PP 2 x TP mesh needs a world size that is a multiple of 4, "
                         f"not {world_size}")
    tp = world_size // (dp * pp)
    if batch % (dp * micro_batches):
        raise ValueError(f"{name}: batch {batch} does not split into {dp} replicas x {micro_batches} micro-batches")
    g = seeded(seed)
    x = randn(g, batch, hidden, dtype=dtype, device=device)
    y = randn(g, batch, hidden, dtype=dtype, device=device)
    w1 = randn(g, pp, hidden, ffn, dtype=dtype, device=device, scale=hidden ** -0.5).requires_grad_()
    w2 = randn(g, pp, ffn, hidden, dtype=dtype, device=device, scale=ffn ** -0.5).requires_grad_()
    mesh = [[[(d * pp + p) * tp + t for t in range(tp)] for p in range(pp)] for d in range(dp)]
    batch_pl = mesh_layout(mesh, [Shard(0), Replicate(), Replicate()])
    cols = mesh_layout(mesh, [Replicate(), Shard(0), Shard(2)])
    rows = mesh_layout(mesh, [Replicate(), Shard(0), Shard(1)])
    return Problem(
        sequential=gpipe_sgd_step,
        distributed=functools.partial(dp_pp_tp_step, dp=dp, pp=pp, tp=tp, groups=groups,
                                      micro_batches=micro_batches, bug=bug),
        inputs=(x, y, w1, w2),
        placements=(batch_pl, batch_pl, cols, rows),
        world_size=world_size,
        expect=(OnRank(world_size - 1), cols, rows),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("x", "y", "w1", "w2"),
    )


# ------------------------------------------------------------------- 3. DP x CP causal attention


def causal_attention(q, k, v):
    """Single-device reference: causal attention over the whole sequence and the mean of its square."""
    S = q.shape[1]
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))  # gg: cp_mask
    out = torch.softmax(scores, dim=-1) @ v  # gg: cp_attn
    return out, out.square().mean()  # gg: cp_loss


def cp_attention(q, k, v, *, cp, bug=None):
    """One rank of DP x CP attention: its DP replica's batch slice, its CP rank's slice of the sequence.
    Keys and values are all-gathered in the CP group; the causal mask compares global positions."""
    world = dist.get_world_size()
    dp = world // cp
    cp_group, dp_group = mesh_groups(dp, cp)
    cp_rank = dist.get_rank() if bug == "cp_rank_global" else dist.get_rank(cp_group)
    gather_group = None if bug == "kv_gather_world" else cp_group
    n = world if bug == "kv_gather_world" else cp
    ks, vs = [torch.empty_like(k) for _ in range(n)], [torch.empty_like(v) for _ in range(n)]
    dist.all_gather(ks, k.contiguous(), group=gather_group)
    dist.all_gather(vs, v.contiguous(), group=gather_group)
    k_all, v_all = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
    s = q.shape[1]
    q_pos = torch.arange(s) + (0 if bug == "mask_local_positions" else cp_rank * s)
    k_pos = torch.arange(k_all.shape[1])
    scores = torch.matmul(q, k_all.transpose(1, 2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v_all)
    total = out.square().sum()
    dist.all_reduce(total, group=cp_group)
    dist.all_reduce(total, group=dp_group)
    return out, total / (out.numel() * world)


DP_CP_BUGS = {
    b.name: b
    for b in (
        Bug("mask_local_positions",
            "The causal mask compares positions within the rank's own sequence shard: the queries of every "
            "shard but the first cannot see the earlier shards' keys and see later ones.",
            "aten.masked_fill", "cp_mask"),
        Bug("cp_rank_global",
            "The sequence offset of the rank's queries comes from the global rank instead of the rank in the "
            "CP group: every DP replica but the first masks as if its queries sat further down the sequence.",
            "aten.masked_fill", "cp_mask"),
        Bug("kv_gather_world",
            "Keys and values are all-gathered over the world group instead of the CP group: each query also "
            "attends to the other DP replicas' sequences.",
            "aten.masked_fill", "cp_mask"),
    )
}


def make_dp_cp(world_size: int = 4, bug: str | None = None, *, cp: int = 2, batch: int | None = None,
               seq: int | None = None, dim: int = 4, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("mesh_dp_cp", bug, DP_CP_BUGS)
    if world_size % cp:
        raise ValueError(f"mesh_dp_cp: world_size {world_size} is not a multiple of cp={cp}")
    dp = world_size // cp
    batch = 2 * dp if batch is None else batch
    seq = 2 * cp if seq is None else seq
    g = seeded(seed)
    q, k, v = (randn(g, batch, seq, dim, dtype=dtype, device=device) for _ in range(3))
    pl = mesh_layout(grid(dp, cp), [Shard(0), Shard(1)])
    return Problem(
        sequential=causal_attention,
        distributed=functools.partial(cp_attention, cp=cp, bug=bug),
        inputs=(q, k, v),
        placements=(pl, pl, pl),
        world_size=world_size,
        expect=(pl, Replicate()),
        name="mesh_dp_cp" if bug is None else f"mesh_dp_cp[{bug}]",
        input_names=("q", "k", "v"),
    )


EXAMPLES = [
    Example("mesh_tp_dp", "TP x DP training step (groups from dist.new_group): vocab-parallel embedding and "
            "column/row-parallel MLP in each TP group, gradients averaged over the DP group, SGD step.",
            make_tp_dp, TP_DP_BUGS, backward=True, runs_on="gloo", world_sizes=(4, 8)),
    Example("mesh_tp_dp_subgroups", "The TP x DP training step with its groups from dist.new_subgroups (TP) and "
            "dist.new_subgroups_by_enumeration (DP).", functools.partial(make_tp_dp, groups="subgroups"),
            {k: TP_DP_BUGS[k] for k in ("tp_allreduce_world", "global_rank_shard")}, backward=True,
            runs_on="gloo", world_sizes=(4, 8)),
    Example("mesh_tp_dp_device_mesh", "The TP x DP training step with a DeviceMesh built inside the rank function: "
            "init_device_mesh(\"cpu\", (dp, tp), mesh_dim_names=(\"dp\", \"tp\")), mesh[\"tp\"].get_group().",
            functools.partial(make_tp_dp, groups="device_mesh"),
            {k: TP_DP_BUGS[k] for k in ("dp_grad_tp_group", "global_rank_shard")}, backward=True,
            runs_on="gloo", world_sizes=(4, 8)),
    Example("mesh_dp_cp", "DP x CP causal attention: batch sharded over DP, sequence over CP; keys and values "
            "all-gathered in the CP group, the causal mask on global positions, the loss reduced over both groups.",
            make_dp_cp, DP_CP_BUGS, runs_on="gloo", world_sizes=(4, 8)),
    Example("mesh_tp_pp", "TP x PP gradients: a GPipe step (send/recv, two micro-batches) over two pipeline stages, "
            "each a column/row tensor-parallel block over W/2 ranks; Megatron's scatter-gather p2p (each TP rank "
            "sends its slice, the next stage all-gathers them in its TP group).",
            make_tp_pp, TP_PP_BUGS, backward=True, runs_on="gloo", world_sizes=(4, 8)),
    Example("mesh_dp_pp_tp", "DP x PP x TP training step on a 3-D mesh (DP 2 x PP 2 x TP 2, groups from "
            "dist.new_group for every TP group, PP pair and DP group): each DP replica runs the TP x PP GPipe step "
            "on its half of the batch, the gradients are averaged over the DP group, SGD step.",
            make_dp_pp_tp, DP_PP_TP_BUGS, backward=True, runs_on="gloo", world_sizes=(8,)),
]
