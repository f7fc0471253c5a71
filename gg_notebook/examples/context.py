"""Context parallel attention: the sequence split across ranks (ring attention, all-gather KV,
zigzag load balancing, DeepSpeed-Ulysses).

The specification is plain single-device multi-head attention, ``softmax(q k^T / sqrt(d) [+ causal
mask]) v`` with ``q``, ``k``, ``v`` of shape ``[batch, heads, seq, head_dim]``. The ranks hold the
sequence in pieces (``Shard(2)``, or the zigzag `Layout`) and compute their own queries' output:

* ring attention: K/V blocks travel around the ring (``batch_isend_irecv``, ``W - 1`` steps) while
  each rank merges the blocks' partial outputs with their log-sum-exp (``torch.logaddexp``, or a
  flash-attention style running max / running sum accumulator);
* all-gather KV: each rank all-gathers K and V and masks with its queries' *global* positions;
* zigzag: the sequence cut in ``2W`` chunks, rank ``r`` holding chunks ``r`` and ``2W - 1 - r`` so
  that every rank gets the same causal work; K/V all-gathered and put back in sequence order, and
  the output gathered and put back in sequence order as well;
* Ulysses: an all-to-all from sequence-sharded to head-sharded, full-sequence attention over the
  rank's heads, and an all-to-all back.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Layout, Problem

from ._common import check_bug, randn, seeded
from ._types import Bug, Example


# ---------------------------------------------------------------------------------------- specs
def attention(q, k, v):
    """Single-device multi-head attention (no mask); q, k, v: [batch, heads, seq, head_dim]."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # gg: scores
    probs = torch.softmax(scores, dim=-1)
    return probs @ v  # gg: pv


def causal_attention(q, k, v):
    """Single-device causal multi-head attention; q, k, v: [batch, heads, seq, head_dim]."""
    S = q.size(-2)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # gg: causal_scores
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))  # gg: causal_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)  # gg: causal_pv


def causal_attention_fwd_bwd(q, k, v, grad_out):
    """Causal attention and the gradients of q, k, v for the upstream gradient ``grad_out``."""
    out = causal_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], grad_outputs=grad_out)
    return out, dq, dk, dv


# ---------------------------------------------------------------------------------------- ring
def _ring_exchange(k, v, rank, world):
    """Post this step's K/V transfer: send ours to the next rank, receive the previous rank's."""
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    k_in, v_in = torch.empty_like(k), torch.empty_like(v)
    reqs = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, k, nxt), dist.P2POp(dist.isend, v, nxt),
        dist.P2POp(dist.irecv, k_in, prev), dist.P2POp(dist.irecv, v_in, prev),
    ])
    return reqs, k_in, v_in


def _block(q, k, v, scale, mask=None):
    """One block's normalized output and its row log-sum-exp."""
    s = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1, keepdim=True)


def _merge(out, lse, block_out, block_lse, merge, bug=None):
    """Merge a block's (normalized output, log-sum-exp) into the running pair."""
    if bug == "average_blocks":
        return (out + block_out) / 2, torch.logaddexp(lse, block_lse)
    if merge == "logaddexp":
        new = torch.logaddexp(lse, block_lse)
        return out * torch.exp(lse - new) + block_out * torch.exp(block_lse - new), new
    if merge == "sigmoid":  # flash-attn's ring code: out -= sigmoid(lse_b - lse) * (out - out_b)
        out = out - torch.sigmoid(block_lse - lse) * (out - block_out)
        return out, lse - torch.nn.functional.logsigmoid(lse - block_lse)
    if merge == "max":  # explicit running maximum, exp and log
        m = torch.maximum(lse, block_lse)
        a, b = torch.exp(lse - m), torch.exp(block_lse - m)
        return (out * a + block_out * b) / (a + b), m + torch.log(a + b)
    raise ValueError(f"unknown merge {merge!r}")


def ring_attention(q, k, v, *, causal=False, merge="logaddexp", bug=None):
    """One rank of ring attention: K/V blocks rotate around the ring, partial outputs merged by LSE."""
    rank, world = dist.get_rank(), dist.get_world_size()
    scale = 1.0 / math.sqrt(q.size(-1))
    S_local = q.size(-2)
    out = lse = None
    k_cur, v_cur = k, v
    for step in range(world):
        if step < world - 1:
            reqs, k_next, v_next = _ring_exchange(k_cur, v_cur, rank, world)
        src = (rank - step) % world  # whose K/V block this is
        if not causal or src <= rank:  # causal: blocks after our own are entirely masked
            mask = None
            if causal and src == rank:
                mask = torch.ones(S_local, S_local, dtype=torch.bool, device=q.device).triu(1)
            block_out, block_lse = _block(q, k_cur, v_cur, scale, mask)
            if out is None:
                out, lse = block_out, block_lse
            else:
                out, lse = _merge(out, lse, block_out, block_lse, merge, bug)
        if step < world - 1:
            for req in reqs:
                req.wait()
            k_cur, v_cur = k_next, v_next
    return out


def ring_attention_flash(q, k, v, *, causal=False, bug=None):
    """Ring attention with a flash-attention style accumulator: running row max ``m``, running sum of
    exponentials ``l`` and unnormalized output ``acc``, both rescaled by ``exp(m_old - m_new)``
    whenever the maximum grows; normalized once at the end.

    Causal: every block is masked at the global positions of its queries (this rank's) and keys (the
    block's owner's); blocks after our own are then entirely masked and add nothing (the first block
    is our own, whose every row keeps its diagonal key, so the running maximum is finite)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    scale = 1.0 / math.sqrt(q.size(-1))
    S_local = q.size(-2)
    m = l = acc = None  # noqa: E741
    k_cur, v_cur = k, v
    for step in range(world):
        if step < world - 1:
            reqs, k_next, v_next = _ring_exchange(k_cur, v_cur, rank, world)
        s = torch.matmul(q, k_cur.transpose(-1, -2)) * scale
        if causal:
            src = (rank - step) % world  # the rank whose K/V block this is
            if bug == "wrong_block_index":
                src = (rank + step) % world  # as if blocks came from the next rank
            pos = torch.arange(S_local, device=q.device)
            q_pos, k_pos = rank * S_local + pos, src * S_local + pos
            if bug == "local_causal_mask":
                q_pos, k_pos = pos, pos  # every block gets the diagonal block's triangle
            s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        block_max = s.amax(dim=-1, keepdim=True)
        if m is None:
            m = block_max
            p = torch.exp(s - m)
            l, acc = p.sum(-1, keepdim=True), torch.matmul(p, v_cur)  # noqa: E741
        else:
            m_new = torch.maximum(m, block_max)
            alpha = torch.exp(m - m_new)
            p = torch.exp(s - m_new)
            if bug == "no_rescale":
                l, acc = l + p.sum(-1, keepdim=True), acc + torch.matmul(p, v_cur)  # noqa: E741
            else:
                l, acc = l * alpha + p.sum(-1, keepdim=True), acc * alpha + torch.matmul(p, v_cur)  # noqa: E741
            m = m_new
        if step < world - 1:
            for req in reqs:
                req.wait()
            k_cur, v_cur = k_next, v_next
    return acc / l


# ---------------------------------------------------------------------------------------- all-gather KV
def _all_gather_seq(t):
    world = dist.get_world_size()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return parts


def allgather_kv_attention(q, k, v, *, causal=True, bug=None):
    """One rank of all-gather-KV context parallelism: full K and V, this rank's queries."""
    rank = dist.get_rank()
    K = torch.cat(_all_gather_seq(k), dim=2)
    V = torch.cat(_all_gather_seq(v), dim=2)
    scores = q @ K.transpose(-2, -1) / math.sqrt(q.size(-1))
    if causal:
        S_local, S = q.size(-2), K.size(-2)
        offset = 0 if bug == "local_causal_mask" else rank * S_local
        q_pos = torch.arange(S_local, device=q.device) + offset  # global positions of our queries
        k_pos = torch.arange(S, device=q.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ V


def allgather_kv_attention_fwd_bwd(q, k, v, grad_out, *, bug=None):
    """All-gather KV forward, and the backward Megatron-style context parallelism writes by hand: the
    gathered K/V are leaves of this rank's graph; their gradients (this rank's queries' share over the
    whole sequence) are reduce-scattered back to the ranks owning the sequence chunks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    K = torch.cat(_all_gather_seq(k.detach()), dim=2).requires_grad_()
    V = torch.cat(_all_gather_seq(v.detach()), dim=2).requires_grad_()
    S_local, S = q.size(-2), K.size(-2)
    scores = q @ K.transpose(-2, -1) / math.sqrt(q.size(-1))
    offset = 0 if bug == "local_causal_mask" else rank * S_local
    q_pos = torch.arange(S_local, device=q.device) + offset
    k_pos = torch.arange(S, device=q.device)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ V
    dq, dK, dV = torch.autograd.grad(out, [q, K, V], grad_outputs=grad_out)
    if bug == "kv_grad_not_reduced":  # keeps its own chunk of its own partial gradient
        return out, dq, dK.chunk(world, dim=2)[rank], dV.chunk(world, dim=2)[rank]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dist.reduce_scatter(dk, list(dK.contiguous().chunk(world, dim=2)))
    dist.reduce_scatter(dv, list(dV.contiguous().chunk(world, dim=2)))
    return out, dq, dk, dv


# ---------------------------------------------------------------------------------------- zigzag
def zigzag_layout(t, rank, world_size):
    """Rank r holds sequence chunks r and 2W-1-r of 2W (dim 2): equal causal work per rank."""
    chunks = t.chunk(2 * world_size, dim=2)
    return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim=2)


ZIGZAG = Layout(zigzag_layout, "zigzag")


def _unzigzag(parts, wrong_order=False):
    """The gathered zigzag pieces (rank order) back in sequence order: every rank's first chunk in
    rank order, then every rank's second chunk in reverse rank order."""
    firsts = [p.chunk(2, dim=2)[0] for p in parts]
    seconds = [p.chunk(2, dim=2)[1] for p in parts]
    if not wrong_order:
        seconds = seconds[::-1]
    return torch.cat(firsts + seconds, dim=2)


def zigzag_attention(q, k, v, *, bug=None):
    """One rank of zigzag causal attention with all-gathered K/V; the output is gathered and put
    back in sequence order on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    K = _unzigzag(_all_gather_seq(k), bug == "kv_chunk_order")
    V = _unzigzag(_all_gather_seq(v), bug == "kv_chunk_order")
    c = q.size(-2) // 2
    k_pos = torch.arange(K.size(-2), device=q.device)
    outs = []
    for half, chunk in enumerate((rank, 2 * world - 1 - rank)):
        q_half = q[:, :, half * c:(half + 1) * c]
        q_pos = torch.arange(c, device=q.device) + chunk * c
        s = torch.matmul(q_half, K.transpose(-2, -1)) / math.sqrt(q.size(-1))
        s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        outs.append(torch.matmul(torch.softmax(s, dim=-1), V))
    out = torch.cat(outs, dim=2)
    return _unzigzag(_all_gather_seq(out), bug == "output_chunk_order")


def _zigzag_positions(rank, world, c, device):
    """Global positions of the 2c tokens rank ``rank`` holds under the zigzag layout."""
    pos = torch.arange(c, device=device)
    return torch.cat([rank * c + pos, (2 * world - 1 - rank) * c + pos])


def zigzag_ring_attention(q, k, v, *, bug=None):
    """One rank of zigzag ring attention: the zigzag chunks' K/V travel around the ring; each block is
    masked at the global positions of our two chunks (queries) and of the sender's two chunks (keys),
    and merged with a flash-attention accumulator (our own block first: every row keeps a key)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    scale = 1.0 / math.sqrt(q.size(-1))
    c = q.size(-2) // 2
    q_pos = _zigzag_positions(rank, world, c, q.device)
    m = l = acc = None  # noqa: E741
    k_cur, v_cur = k, v
    for step in range(world):
        if step < world - 1:
            reqs, k_next, v_next = _ring_exchange(k_cur, v_cur, rank, world)
        src = (rank - step) % world
        if bug == "contiguous_key_positions":  # as if the sender held one contiguous piece
            k_pos = src * 2 * c + torch.arange(2 * c, device=q.device)
        else:
            k_pos = _zigzag_positions(src, world, c, q.device)
        s = torch.matmul(q, k_cur.transpose(-1, -2)) * scale
        s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        block_max = s.amax(dim=-1, keepdim=True)
        m_new = block_max if m is None else torch.maximum(m, block_max)
        p = torch.exp(s - m_new)
        if m is None:
            l, acc = p.sum(-1, keepdim=True), torch.matmul(p, v_cur)  # noqa: E741
        else:
            alpha = torch.exp(m - m_new)
            l, acc = l * alpha + p.sum(-1, keepdim=True), acc * alpha + torch.matmul(p, v_cur)  # noqa: E741
        m = m_new
        if step < world - 1:
            for req in reqs:
                req.wait()
            k_cur, v_cur = k_next, v_next
    return acc / l


# ---------------------------------------------------------------------------------------- Ulysses
def _all_to_all(x, scatter_dim, gather_dim):
    """Split ``x`` along ``scatter_dim`` (piece j to rank j) and concatenate what the ranks send
    along ``gather_dim``."""
    world = dist.get_world_size()
    inputs = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
    dist.all_to_all(outputs, inputs)
    return torch.cat(outputs, dim=gather_dim)


def _seq_to_heads_single(t):
    """[B, H, S/W, D] -> [B, H/W, S, D] with one ``all_to_all_single`` (splits dim 0)."""
    world = dist.get_world_size()
    B, H, S_local, D = t.shape
    x = t.reshape(B, world, H // world, S_local, D).transpose(0, 1).contiguous()
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x)  # y[j]: rank j's sequence block of our heads
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * S_local, D)


def _heads_to_seq_single(t):
    """[B, H/W, S, D] -> [B, H, S/W, D], the inverse all-to-all."""
    world = dist.get_world_size()
    B, H_local, S, D = t.shape
    x = t.reshape(B, H_local, world, S // world, D).permute(2, 0, 1, 3, 4).contiguous()
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x)  # y[j]: our sequence block of rank j's heads
    return y.transpose(0, 1).reshape(B, world * H_local, S // world, D)


def ulysses_attention(q, k, v, *, causal=True, single=False, bug=None):
    """One rank of DeepSpeed-Ulysses: all-to-all sequence -> heads, full-sequence attention over this
    rank's heads, all-to-all heads -> sequence."""
    if single:
        qh, kh, vh = (_seq_to_heads_single(t) for t in (q, k, v))
    elif bug == "a2a_dims_swapped":  # scatter the sequence, gather the heads (and back the same way)
        qh, kh, vh = (_all_to_all(t, scatter_dim=2, gather_dim=1) for t in (q, k, v))
    else:
        qh, kh, vh = (_all_to_all(t, scatter_dim=1, gather_dim=2) for t in (q, k, v))
    S = qh.size(-2)
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(qh.size(-1))
    if causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    o = torch.softmax(scores, dim=-1) @ vh
    if single:
        return _heads_to_seq_single(o)
    if bug == "a2a_dims_swapped":
        return _all_to_all(o, scatter_dim=1, gather_dim=2)
    return _all_to_all(o, scatter_dim=2, gather_dim=1)


# ---------------------------------------------------------------------------------------- registry
BUGS_RING = {
    b.name: b
    for b in (
        Bug("average_blocks",
            "The blocks' partial outputs are averaged ((out + block_out) / 2) instead of weighted by "
            "exp(lse_block - lse_total): every block counts the same whatever its share of the softmax mass.",
            "aten.bmm", "pv"),
    )
}
BUGS_RING_FLASH = {
    b.name: b
    for b in (
        Bug("no_rescale",
            "When a block raises the running maximum, the running sum and the unnormalized output are "
            "not rescaled by exp(m_old - m_new).",
            "aten.bmm", "pv"),
    )
}
BUGS_RING_CAUSAL = {
    b.name: b
    for b in (
        Bug("local_causal_mask",
            "Every block is masked with the local triangle (positions 0..S/W-1 for queries and keys) "
            "instead of the global positions: earlier blocks lose keys, later blocks are not masked.",
            "aten.bmm", "causal_pv"),
        Bug("no_rescale", BUGS_RING_FLASH["no_rescale"].description, "aten.bmm", "causal_pv"),
    )
}
# at W=2 the next and the previous rank are the same rank: refuted from W=3 on (tests only)
WRONG_BLOCK_INDEX = Bug("wrong_block_index",
                        "The causal ring takes the block received at step t to be rank r+t's (the ring sends the "
                        "other way): the wrong blocks are masked.", "aten.bmm", "causal_pv")
BUGS_ALLGATHER = {
    b.name: b
    for b in (
        Bug("local_causal_mask",
            "The causal mask is built from the queries' local positions (0..S/W-1) instead of their "
            "global positions rank*S/W + i: later ranks' queries see too few keys.",
            "aten.masked_fill", "causal_mask"),
    )
}
BUGS_ALLGATHER_FWD_BWD = {
    b.name: b
    for b in (
        Bug("local_causal_mask", BUGS_ALLGATHER["local_causal_mask"].description, "aten.masked_fill",
            "causal_mask"),
        Bug("kv_grad_not_reduced",
            "The gathered K/V's gradients are not reduce-scattered: each rank keeps its own chunk of its own "
            "partial gradient, missing the other ranks' queries' contributions.",
            "aten.transpose", "causal_scores"),
    )
}
BUGS_ZIGZAG = {
    b.name: b
    for b in (
        Bug("kv_chunk_order",
            "The gathered K/V chunks are put back with the second halves in rank order instead of "
            "reverse rank order: keys sit at the wrong positions under the causal mask.",
            "aten.masked_fill", "causal_mask"),
        Bug("output_chunk_order",
            "On the way back the output's second chunks are concatenated in rank order instead of "
            "reverse rank order.",
            "aten._unsafe_view", "causal_pv"),
    )
}
# zigzag ring attention is not registered: not proved yet (tests/test_context_parallel.py, strict xfail)
BUGS_ZIGZAG_RING = {
    b.name: b
    for b in (
        Bug("contiguous_key_positions",
            "The received block's key positions are computed as if the sender held one contiguous piece of "
            "the sequence (src*2c + i) instead of its two zigzag chunks: the causal mask is wrong.",
            "aten.bmm", "causal_pv"),
    )
}
BUGS_ULYSSES = {
    b.name: b
    for b in (
        Bug("a2a_dims_swapped",
            "The all-to-all's scatter and gather dims are swapped (scatter the sequence, gather the heads, "
            "and the inverse on the way back): each rank attends within a slice of the sequence.",
            "aten.bmm", "causal_scores"),
    )
}


def _inputs(world_size, batch, heads, seq, head_dim, seed, dtype, device):
    g = seeded(seed)
    return tuple(randn(g, batch, heads, seq, head_dim, dtype=dtype, device=device) for _ in range(3))


def _problem(name, spec, program, bug, placement, expect, world_size, batch, heads, seq, head_dim, seed,
             dtype, device):
    return Problem(
        sequential=spec,
        distributed=program,
        inputs=_inputs(world_size, batch, heads, seq, head_dim, seed, dtype, device),
        placements=(placement,) * 3,
        world_size=world_size,
        expect=(expect,),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("q", "k", "v"),
    )


def make_ring(world_size: int = 2, bug: str | None = None, *, merge: str = "logaddexp", batch: int = 1,
              heads: int = 2, seq: int = 8, head_dim: int = 4, seed: int = 0, dtype=torch.float64,
              device="cpu") -> Problem:
    check_bug("ring_attention", bug, BUGS_RING)
    return _problem("ring_attention", attention, functools.partial(ring_attention, merge=merge, bug=bug), bug,
                    Shard(2), Shard(2), world_size, batch, heads, seq, head_dim, seed, dtype, device)


def make_ring_flash(world_size: int = 2, bug: str | None = None, *, batch: int = 1, heads: int = 2, seq: int = 8,
                    head_dim: int = 4, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("ring_attention_flash", bug, BUGS_RING_FLASH)
    return _problem("ring_attention_flash", attention, functools.partial(ring_attention_flash, bug=bug), bug,
                    Shard(2), Shard(2), world_size, batch, heads, seq, head_dim, seed, dtype, device)


def make_ring_causal(world_size: int = 2, bug: str | None = None, *, batch: int = 1, heads: int = 2,
                     seq: int = 8, head_dim: int = 4, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("ring_attention_causal", bug, dict(BUGS_RING_CAUSAL, wrong_block_index=WRONG_BLOCK_INDEX))
    return _problem("ring_attention_causal", causal_attention,
                    functools.partial(ring_attention_flash, causal=True, bug=bug), bug, Shard(2), Shard(2),
                    world_size, batch, heads, seq, head_dim, seed, dtype, device)


def make_allgather(world_size: int = 2, bug: str | None = None, *, causal: bool = True, batch: int = 1,
                   heads: int = 2, seq: int = 8, head_dim: int = 4, seed: int = 0, dtype=torch.float64,
                   device="cpu") -> Problem:
    check_bug("allgather_kv_attention", bug, BUGS_ALLGATHER)
    return _problem("allgather_kv_attention", causal_attention if causal else attention,
                    functools.partial(allgather_kv_attention, causal=causal, bug=bug), bug, Shard(2), Shard(2),
                    world_size, batch, heads, seq, head_dim, seed, dtype, device)


def make_allgather_fwd_bwd(world_size: int = 2, bug: str | None = None, *, batch: int = 1, heads: int = 2,
                           seq: int = 8, head_dim: int = 4, seed: int = 0, dtype=torch.float64,
                           device="cpu") -> Problem:
    check_bug("allgather_kv_attention_fwd_bwd", bug, BUGS_ALLGATHER_FWD_BWD)
    g = seeded(seed)
    q, k, v, grad_out = (randn(g, batch, heads, seq, head_dim, dtype=dtype, device=device) for _ in range(4))
    name = "allgather_kv_attention_fwd_bwd"
    return Problem(
        sequential=causal_attention_fwd_bwd,
        distributed=functools.partial(allgather_kv_attention_fwd_bwd, bug=bug),
        inputs=(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad_out),
        placements=(Shard(2),) * 4,
        world_size=world_size,
        expect=(Shard(2),) * 4,
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("q", "k", "v", "grad_out"),
    )


def make_zigzag(world_size: int = 2, bug: str | None = None, *, batch: int = 1, heads: int = 2, seq: int = 16,
                head_dim: int = 4, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("zigzag_attention", bug, BUGS_ZIGZAG)
    return _problem("zigzag_attention", causal_attention, functools.partial(zigzag_attention, bug=bug), bug,
                    ZIGZAG, Replicate(), world_size, batch, heads, seq, head_dim, seed, dtype, device)


def make_zigzag_ring(world_size: int = 2, bug: str | None = None, *, batch: int = 1, heads: int = 2,
                     seq: int = 16, head_dim: int = 4, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("zigzag_ring_attention", bug, BUGS_ZIGZAG_RING)
    return _problem("zigzag_ring_attention", causal_attention, functools.partial(zigzag_ring_attention, bug=bug),
                    bug, ZIGZAG, ZIGZAG, world_size, batch, heads, seq, head_dim, seed, dtype, device)


def make_ulysses(world_size: int = 2, bug: str | None = None, *, causal: bool = True, single: bool = False,
                 batch: int = 1, heads: int = 4, seq: int = 16, head_dim: int = 4, seed: int = 0,
                 dtype=torch.float64, device="cpu") -> Problem:
    check_bug("ulysses_attention", bug, BUGS_ULYSSES)
    return _problem("ulysses_attention", causal_attention if causal else attention,
                    functools.partial(ulysses_attention, causal=causal, single=single, bug=bug), bug, Shard(2),
                    Shard(2), world_size, batch, heads, seq, head_dim, seed, dtype, device)


EXAMPLES = [
    Example("ring_attention", "Context parallel ring attention: K/V blocks rotate around the ring with "
            "batch_isend_irecv, partial outputs merged by log-sum-exp (torch.logaddexp).", make_ring, BUGS_RING,
            runs_on="gloo"),
    Example("ring_attention_flash", "Context parallel ring attention with a flash-attention accumulator "
            "(running max, running sum, rescaled unnormalized output).", make_ring_flash, BUGS_RING_FLASH,
            runs_on="gloo"),
    Example("ring_attention_causal", "Causal ring attention (flash accumulator): each block masked at its global "
            "query and key positions, blocks after the rank's own entirely masked.", make_ring_causal,
            BUGS_RING_CAUSAL, runs_on="gloo"),
    Example("allgather_kv_attention", "Context parallel causal attention with all-gathered K/V and a causal "
            "mask at the queries' global positions.", make_allgather, BUGS_ALLGATHER),
    Example("allgather_kv_attention_fwd_bwd", "All-gather KV causal attention forward and backward: the "
            "gathered K/V's gradients reduce-scattered to the ranks owning the chunks.", make_allgather_fwd_bwd,
            BUGS_ALLGATHER_FWD_BWD, backward=True, runs_on="gloo"),  # LocalTensorMode lacks list reduce_scatter
    Example("zigzag_attention", "Load-balanced (zigzag) causal context parallelism: rank r holds chunks r and "
            "2W-1-r, all-gathered K/V and output put back in sequence order.", make_zigzag, BUGS_ZIGZAG),
    Example("ulysses_attention", "DeepSpeed-Ulysses: all-to-all sequence -> heads, local causal attention over "
            "the rank's heads, all-to-all back.", make_ulysses, BUGS_ULYSSES),
]
