"""Mixture-of-experts layers with expert parallelism (GShard / Switch style).

The specification is a single-device MoE layer: a router (linear, softmax, top-k with
``torch.topk``), ``E`` per-expert MLPs (``relu(x @ w1[e]) @ w2[e]``), the outputs combined with the
router probabilities of the chosen experts, and the load-balancing auxiliary loss of Switch/GShard
``E * sum_e f_e * P_e`` (``f_e``: fraction of tokens whose first choice is expert ``e``; ``P_e``:
mean router probability of ``e``).

Expert parallelism: the stacked expert weights ``w1 [E, d, h]`` and ``w2 [E, h, d]`` are sharded
along the expert dim (``Shard(0)``: rank ``r`` holds experts ``r*E/W .. (r+1)*E/W - 1``), the tokens
along the batch (``Shard(0)``), the router is replicated. Each rank routes its own tokens, sends
every token to the rank holding its expert with ``dist.all_to_all_single``, runs its local experts,
sends the results back and combines them. The auxiliary loss needs the fractions and mean
probabilities over *all* tokens: each rank all-reduces its local ``f`` and ``P`` with ``AVG`` (the
ranks hold equally many tokens) before the product.

* ``moe_capacity`` (top-2, GShard) and ``moe_capacity_top1`` (Switch): a fixed capacity ``C`` per
  expert and group of tokens. Tokens are ``[G, S, d]`` (``G`` groups of ``S`` tokens, as in
  GShard's ``GSM`` einsums); in each group the first choices queue before the second ones and a
  token beyond the capacity of its expert is dropped (the specification drops the same ones: the
  capacity is per group, and each rank holds whole groups). Dispatch is the one-hot/cumsum
  ``[G, S, E, C]`` mask, the exchange an ``all_to_all_single`` with equal splits of the
  ``[E, G/W, C, d]`` buffer.
* ``moe_dropless`` (top-2, as Megablocks / Megatron's all-to-all token dispatcher): tokens ``[T, d]``
  sorted by expert (``argsort``), the tokens per expert counted and exchanged
  (``all_to_all_single`` of the counts), the split sizes read with ``.tolist()``, the tokens
  exchanged with ``all_to_all_single(out, inp, output_split_sizes, input_split_sizes)``, each local
  expert run on its variable-size groups, the results sent back and unpermuted with the inverse
  permutation. The split sizes and permutations depend on the routing, i.e. on the input values:
  gg_notebook captures the programs *for the routing of the example inputs*
  (`gg_notebook.capture.specialize`), so the verdict of the correct program is "assumed" (it holds
  for inputs that route the same way), and bugs are refuted on the example inputs.

Bugs: the load-balancing loss from the local tokens only (``aux_local``) or all-reduced with SUM
(``aux_summed``); the top-k outputs combined without the router probabilities
(``combine_unweighted``); experts misaligned with the weight shards (``experts_misaligned``:
round-robin dispatch; ``expert_offset``: the local index of a global expert id computed with the
round-robin convention); the unpermute done with the forward permutation (``unpermute_forward``).
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


# --------------------------------------------------------------------------------------------------
# Router, auxiliary loss, experts (shared by the specification and the ranks)


def route(x, wg, k):
    """Router of tokens ``x [..., d]`` with gate weights ``wg [d, E]``: probabilities and top-k."""
    probs = torch.softmax(x @ wg, dim=-1)  # gg: router
    gate, idx = torch.topk(probs, k, dim=-1)  # gg: topk
    return probs, gate, idx


def balance_terms(probs, idx, E):
    """Switch's f (fraction of tokens whose first choice is each expert) and P (mean probability)."""
    tokens = tuple(range(probs.dim() - 1))
    f = F.one_hot(idx[..., 0], E).to(probs.dtype).mean(dim=tokens)  # gg: aux_f
    p = probs.mean(dim=tokens)  # gg: aux_p
    return f, p


def aux_loss(f, p, E):
    return E * (f * p).sum()  # gg: aux


def capacity_masks(gate, idx, E, capacity, weighted=True):
    """GShard dispatch and combine tensors ``[G, S, E, C]``, one group of tokens per leading index:
    the k-th choices of a group queue after its (k-1)-th ones; choices beyond capacity are dropped."""
    G, S, k = idx.shape
    mask = F.one_hot(idx, E).to(gate.dtype)  # [G, S, k, E]
    mask = mask.transpose(1, 2).reshape(G, k * S, E)  # first choices first
    loc = torch.cumsum(mask, dim=1) - 1  # gg: cumsum
    keep = mask * (loc < capacity)
    pos = (loc * keep).sum(-1).long()  # slot of each kept choice in its expert's buffer
    disp = keep.unsqueeze(-1) * F.one_hot(pos, capacity).to(gate.dtype).unsqueeze(2)  # [G, kS, E, C]
    comb = gate.transpose(1, 2).reshape(G, k * S)[..., None, None] * disp if weighted else disp
    disp = disp.view(G, k, S, E, capacity).sum(1)
    comb = comb.view(G, k, S, E, capacity).sum(1)
    return disp, comb


def experts_mlp(xin, w1, w2):
    """Every expert's MLP on its buffer: ``xin [E, G, C, d]``, ``w1 [E, d, h]``, ``w2 [E, h, d]``."""
    h = torch.relu(torch.einsum("egcm,emh->egch", xin, w1))  # gg: expert_in
    return torch.einsum("egch,ehm->egcm", h, w2)


# --------------------------------------------------------------------------------------------------
# Capacity-based dispatch (GShard / Switch)


def moe_capacity(x, wg, w1, w2, *, k, capacity):
    """Single-device reference: a GShard MoE layer, capacity ``capacity`` per expert and group."""
    E = wg.shape[1]
    probs, gate, idx = route(x, wg, k)
    disp, comb = capacity_masks(gate, idx, E, capacity)
    xin = torch.einsum("gsec,gsm->egcm", disp, x)  # gg: dispatch
    y = experts_mlp(xin, w1, w2)
    out = torch.einsum("gsec,egcm->gsm", comb, y)  # gg: combine
    f, p = balance_terms(probs, idx, E)
    return out, aux_loss(f, p, E)


def reduce_balance_terms(f, p, bug=None):
    """The Switch fractions and mean probabilities over all tokens: AVG over the ranks (each holds
    equally many tokens)."""
    if bug == "aux_local":  # the load-balancing terms of the local tokens only
        return f, p
    op = dist.ReduceOp.SUM if bug == "aux_summed" else dist.ReduceOp.AVG
    dist.all_reduce(f, op=op)
    dist.all_reduce(p, op=op)
    return f, p


def moe_capacity_ep(x, wg, w1, w2, *, k, capacity, bug=None):
    """One rank: its groups of tokens ``x [G/W, S, d]``, its experts ``w1 [E/W, d, h]``, ``w2 [E/W, h, d]``."""
    W = dist.get_world_size()
    E = wg.shape[1]
    El = E // W
    Gl, S, M = x.shape
    probs, gate, idx = route(x, wg, k)
    disp, comb = capacity_masks(gate, idx, E, capacity, weighted=bug != "combine_unweighted")
    xin = torch.einsum("gsec,gsm->egcm", disp, x)  # [E, G/W, C, d]: expert-major
    if bug == "experts_misaligned":  # expert e sent to rank e % W, but the weights are sharded in blocks
        xin = xin.view(El, W, Gl, capacity, M).transpose(0, 1)
    xin = xin.contiguous()
    recv = torch.empty_like(xin)
    dist.all_to_all_single(recv, xin)  # block i: rank i's tokens for my experts
    recv = recv.view(W, El, Gl, capacity, M).transpose(0, 1).reshape(El, W * Gl, capacity, M)
    y = experts_mlp(recv, w1, w2)
    y = y.view(El, W, Gl, capacity, M).transpose(0, 1).contiguous()
    back = torch.empty_like(y)
    dist.all_to_all_single(back, y)  # block j: my tokens through rank j's experts
    if bug == "experts_misaligned":
        back = back.transpose(0, 1)
    out = torch.einsum("gsec,egcm->gsm", comb, back.reshape(E, Gl, capacity, M))
    f, p = reduce_balance_terms(*balance_terms(probs, idx, E), bug)
    return out, aux_loss(f, p, E)


AUX_BUGS = (
    Bug("aux_local",
        "The load-balancing loss is computed from the rank's own tokens only: the expert fractions and "
        "mean probabilities are never all-reduced, so every rank reports a different auxiliary loss.",
        "aten.mean", "aux_f"),
    Bug("aux_summed",
        "The expert fractions and mean probabilities are all-reduced with SUM instead of AVG: the "
        "auxiliary loss is world_size**2 times too large.", "aten.mul", "aux"),
)

CAPACITY_BUGS = {
    b.name: b
    for b in AUX_BUGS + (
        Bug("combine_unweighted",
            "The expert outputs are combined without the router probabilities (the dispatch mask is used as "
            "the combine tensor): the top-k outputs are simply added. The first value no rank computes is "
            "the top-k router probabilities.", "aten.topk", "topk"),
        Bug("experts_misaligned",
            "The dispatch buffer is sent round-robin (expert e to rank e % W) while the expert weights are "
            "sharded in contiguous blocks: tokens run through another expert's weights.", "aten.bmm",
            "expert_in"),
    )
}


def make_capacity(world_size: int = 2, bug: str | None = None, *, k: int = 2, groups: int = 8, seq: int = 4,
                  d: int = 4, h: int = 6, experts: int = 8, capacity: int = 2, seed: int = 0,
                  dtype=torch.float64, device="cpu") -> Problem:
    name = "moe_capacity" if k == 2 else f"moe_capacity_top{k}"
    check_bug(name, bug, CAPACITY_BUGS)
    if groups % world_size or experts % world_size:
        raise ValueError(f"{name}: groups ({groups}) and experts ({experts}) must divide by world_size ({world_size})")
    g = seeded(seed)
    x = randn(g, groups, seq, d, dtype=dtype, device=device)
    wg = randn(g, d, experts, dtype=dtype, device=device)
    w1 = randn(g, experts, d, h, dtype=dtype, device=device, scale=d ** -0.5)
    w2 = randn(g, experts, h, d, dtype=dtype, device=device, scale=h ** -0.5)
    return Problem(
        sequential=functools.partial(moe_capacity, k=k, capacity=capacity),
        distributed=functools.partial(moe_capacity_ep, k=k, capacity=capacity, bug=bug),
        inputs=(x, wg, w1, w2),
        placements=(Shard(0), Replicate(), Shard(0), Shard(0)),
        world_size=world_size,
        expect=(Shard(0), Replicate()),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("x", "wg", "w1", "w2"),
    )


make_capacity_top1 = functools.partial(make_capacity, k=1, capacity=3)




# --------------------------------------------------------------------------------------------------
# Dropless dispatch (data-dependent split sizes)


def expert_ffn(x, w1, w2):
    return torch.relu(x @ w1) @ w2  # gg: ffn


def moe_dropless(x, wg, w1, w2, *, k):
    """Single-device reference of a dropless MoE layer: tokens sorted by expert, each expert's MLP
    on its group, the results put back in token order and combined."""
    T, M = x.shape
    E = wg.shape[1]
    probs, gate, idx = route(x, wg, k)
    flat = idx.reshape(-1)  # the expert of every (token, choice)
    order = torch.argsort(flat, stable=True)
    xs = x[order // k]  # gg: permute
    counts = F.one_hot(flat, E).sum(0).tolist()
    ys = torch.cat([expert_ffn(c, w1[e], w2[e]) for e, c in enumerate(xs.split(counts))])
    y = ys[torch.argsort(order)]  # gg: unpermute
    out = (y.view(T, k, M) * gate.unsqueeze(-1)).sum(1)  # gg: dropless_combine
    f, p = balance_terms(probs, idx, E)
    return out, aux_loss(f, p, E)


def moe_dropless_ep(x, wg, w1, w2, *, k, bug=None):
    rank, W = dist.get_rank(), dist.get_world_size()
    E = wg.shape[1]
    El = E // W
    T, M = x.shape
    probs, gate, idx = route(x, wg, k)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x[order // k]
    counts = F.one_hot(flat, E).sum(0)  # tokens for each expert
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts)  # [W * El]: from every rank, tokens for my experts
    in_splits = counts.view(W, El).sum(1).tolist()
    out_splits = recv_counts.view(W, El).sum(1).tolist()
    recv = x.new_empty(sum(out_splits), M)
    dist.all_to_all_single(recv, xs, out_splits, in_splits)
    chunks = recv.split(recv_counts.tolist())  # rank-major: (rank 0: e0, e1, ..), (rank 1: ..)
    first = rank * El  # my experts: global ids first .. first + El - 1
    ys = []
    for s in range(W):
        for e in range(first, first + El):
            local = e // W if bug == "expert_offset" else e - first  # the index of expert e in my shard
            ys.append(expert_ffn(chunks[s * El + e - first], w1[local], w2[local]))
    back = torch.empty_like(xs)
    dist.all_to_all_single(back, torch.cat(ys), in_splits, out_splits)
    inverse = order if bug == "unpermute_forward" else torch.argsort(order)
    y = back[inverse]
    out = (y.view(T, k, M) * gate.unsqueeze(-1)).sum(1)
    f, p = reduce_balance_terms(*balance_terms(probs, idx, E), bug)
    return out, aux_loss(f, p, E)


DROPLESS_BUGS = {
    b.name: b
    for b in AUX_BUGS + (
        Bug("unpermute_forward",
            "The expert outputs are put back in token order with the sorting permutation itself instead of "
            "its inverse. Rows are only moved, so the first wrong value is the combine that weights them.",
            "aten.mul", "dropless_combine"),
        Bug("expert_offset",
            "The rank maps a global expert id e to its local index with the round-robin convention e // W, "
            "but the experts are sharded in contiguous blocks (e - rank * E/W): tokens run through the "
            "weights of another expert.", "aten.mm", "ffn"),
    )
}


def make_dropless(world_size: int = 2, bug: str | None = None, *, k: int = 2, tokens: int = 16, d: int = 4,
                  h: int = 6, experts: int = 8, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    name = "moe_dropless"
    check_bug(name, bug, DROPLESS_BUGS)
    if tokens % world_size or experts % world_size:
        raise ValueError(f"{name}: tokens ({tokens}) and experts ({experts}) must divide by world_size ({world_size})")
    g = seeded(seed)
    x = randn(g, tokens, d, dtype=dtype, device=device)
    wg = randn(g, d, experts, dtype=dtype, device=device)
    w1 = randn(g, experts, d, h, dtype=dtype, device=device, scale=d ** -0.5)
    w2 = randn(g, experts, h, d, dtype=dtype, device=device, scale=h ** -0.5)
    return Problem(
        sequential=functools.partial(moe_dropless, k=k),
        distributed=functools.partial(moe_dropless_ep, k=k, bug=bug),
        inputs=(x, wg, w1, w2),
        placements=(Shard(0), Replicate(), Shard(0), Shard(0)),
        world_size=world_size,
        expect=(Shard(0), Replicate()),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("x", "wg", "w1", "w2"),
    )


EXAMPLES = [
    Example("moe_capacity", "Mixture of experts, GShard top-2 with a fixed capacity per expert and group: one-hot/"
            "cumsum dispatch, all_to_all_single with equal splits, experts sharded over the ranks, weighted "
            "combine, load-balancing loss all-reduced (AVG).", make_capacity, CAPACITY_BUGS),
    Example("moe_capacity_top1", "Mixture of experts, Switch top-1 with a fixed capacity per expert and group "
            "(expert parallel, all_to_all_single with equal splits).", make_capacity_top1,
            {n: b for n, b in CAPACITY_BUGS.items() if n in ("combine_unweighted", "experts_misaligned")}),
    Example("moe_dropless", "Mixture of experts, dropless top-2: tokens sorted by expert, counts exchanged with "
            "all_to_all_single, .tolist() split sizes, variable-size all_to_all_single, per-expert MLPs, "
            "reverse exchange, unpermute, weighted combine. Captured for the routing of the example inputs, so "
            "the verdict is 'assumed' (holds for inputs that route the same way).", make_dropless, DROPLESS_BUGS,
            runs_on="gloo", verdict="assumed"),
]
