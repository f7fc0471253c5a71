"""Sharded bound propagation through a ReLU MLP: interval bounds (IBP) and CROWN linear bounds.

Given a batch of input boxes ``[lb, ub]`` (``[B, d]`` each) and a ReLU MLP
``z_k = h_{k-1} @ W_k.T + b_k``, ``h_k = relu(z_k)`` (weights in ``nn.Linear`` layout ``[out, in]``),
the specification computes certified lower and upper bounds of the last layer's output:

* IBP: each linear layer maps a box to the box ``l @ W+.T + u @ W-.T + b``,
  ``u @ W+.T + l @ W-.T + b`` (``W+ = W.clamp(min=0)``, ``W- = W.clamp(max=0)``), ReLU maps it
  monotonically.
* CROWN (backward linear relaxation, as in auto_LiRPA): every ReLU with pre-activation bounds
  ``[l, u]`` is bounded by two lines of one slope ``a`` (``a = u/(u-l)`` for unstable neurons,
  ``1`` for stably active, ``0`` for stably inactive ones): ``a*z <= relu(z) <= a*z + c`` with
  ``c = -a*l`` for unstable neurons and ``0`` otherwise. The linear bound matrix ``A`` of the bounded
  layer is propagated backward (``A <- (A * a) @ W``), the intercepts collected (``A+ @ c`` for the
  upper bound, ``A- @ c`` for the lower one, ``A @ b``), and the result concretized with the input
  box: ``upper = A+ @ ub + A- @ lb + bias``, ``lower = A+ @ lb + A- @ ub + bias``. Intermediate
  pre-activation bounds come from the same backward pass (full CROWN).

Two distributed programs, written with plain ``torch.distributed``:

* FSDP-style (three linear layers): every weight and bias is sharded by rows (``Shard(0)``) and
  all-gathered (``all_gather_into_tensor``) right before its first use; every rank then computes the
  full bounds. Data movement only: the bounds are bit-for-bit those of the specification
  (``gg.verify(problem, exact="bitwise")`` proves it).
* Tensor parallel (two linear layers, Megatron-style): the first layer column-parallel (rows of
  ``W1``, ``b1`` sharded), the second row-parallel (columns of ``W2`` sharded). Each rank bounds its
  own hidden neurons, relaxes them, and propagates its columns of ``A`` back to the input: the
  partial ``A`` matrices and intercepts are all-reduced (SUM) *before* concretization (the
  positive part of a sum is not the sum of the positive parts).

Outputs: ``(lower, upper)``, ``[B, out]`` each, on every rank.

``BITWISE_BUGS`` holds a variant that only ``exact="bitwise"`` tells apart (the FSDP rank multiplies by its
own rows of a weight before gathering the partial products: the same bounds over the reals, another
summation order); it is not in the registry, whose tests verify over the reals.
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

# ------------------------------------------------------------------------------ the specification


def linear_box(l, u, W, b):
    """IBP through one linear layer: the box ``[l, u]`` mapped by ``x @ W.T + b``."""
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    lower = l @ Wp.T + u @ Wn.T + b  # gg: ibp_lower
    upper = u @ Wp.T + l @ Wn.T + b  # gg: ibp_upper
    return lower, upper


def ibp(lb, ub, *params):
    """Interval bounds of the MLP ``params = (W1, b1, W2, b2, ...)`` on the boxes ``[lb, ub]``."""
    Ws, bs = params[0::2], params[1::2]
    l, u = lb, ub
    for k, (W, b) in enumerate(zip(Ws, bs)):
        l, u = linear_box(l, u, W, b)
        if k < len(Ws) - 1:
            l, u = F.relu(l), F.relu(u)
    return l, u


def relu_relaxation(l, u):
    """CROWN's lines for ``relu(z)``, ``l <= z <= u``: ``slope*z <= relu(z) <= slope*z + intercept``."""
    unstable = (l < 0) & (u > 0)  # gg: relaxation
    active = (l >= 0).to(l.dtype)
    slope = torch.where(unstable, u / (u - l), active)
    intercept = torch.where(unstable, -slope * l, torch.zeros_like(l))
    return slope, intercept


def concretize(A, lb, ub, c_lo, c_hi):
    """Bounds of ``A @ x + c`` over the boxes: ``[B, n]`` boxes, ``A`` ``[o, n]`` or ``[B, o, n]``."""
    Ap, An = A.clamp(min=0), A.clamp(max=0)  # gg: concretize
    lower = (Ap @ lb.unsqueeze(-1)).squeeze(-1) + (An @ ub.unsqueeze(-1)).squeeze(-1) + c_lo
    upper = (Ap @ ub.unsqueeze(-1)).squeeze(-1) + (An @ lb.unsqueeze(-1)).squeeze(-1) + c_hi
    return lower, upper


def backward_bounds(lb, ub, Ws, bs, slopes, intercepts):
    """CROWN bounds of the pre-activation ``z_k`` of the last of ``Ws``, given the relaxations of the
    ReLUs before it: ``A`` starts as ``W_k`` and is propagated back to the input."""
    A = Ws[-1]
    c_lo, c_hi = bs[-1], bs[-1]
    for j in reversed(range(len(Ws) - 1)):
        t = intercepts[j].unsqueeze(-1)
        c_lo = c_lo + (A.clamp(max=0) @ t).squeeze(-1)  # gg: crown_lower_intercept
        c_hi = c_hi + (A.clamp(min=0) @ t).squeeze(-1)  # gg: crown_upper_intercept
        A = A * slopes[j].unsqueeze(1)  # gg: crown_relax
        bias = A @ bs[j]
        c_lo, c_hi = c_lo + bias, c_hi + bias
        A = A @ Ws[j]  # gg: crown_back
    return concretize(A, lb, ub, c_lo, c_hi)


def crown(lb, ub, *params):
    """CROWN bounds of the MLP ``params = (W1, b1, W2, b2, ...)`` on the boxes ``[lb, ub]``."""
    Ws, bs = params[0::2], params[1::2]
    slopes, intercepts = [], []
    for k in range(len(Ws)):
        lower, upper = backward_bounds(lb, ub, Ws[: k + 1], bs[: k + 1], slopes, intercepts)
        if k < len(Ws) - 1:
            s, t = relu_relaxation(lower, upper)
            slopes.append(s)
            intercepts.append(t)
    return lower, upper


# ------------------------------------------------------------------------------------- FSDP style


def gather(shard):
    """FSDP's unshard: the full parameter from every rank's rows."""
    full = torch.empty((shard.shape[0] * dist.get_world_size(), *shard.shape[1:]), dtype=shard.dtype,
                       device=shard.device)
    dist.all_gather_into_tensor(full, shard.contiguous())
    return full


def ibp_fsdp(lb, ub, *shards, bug=None):
    """One FSDP rank: each layer's weight and bias all-gathered right before the layer, full IBP."""
    Ws, bs = shards[0::2], shards[1::2]
    l, u = lb, ub
    pool = {}  # unsharded buffers by shape
    for k, (W, b) in enumerate(zip(Ws, bs)):
        W = gather(W)
        if bug == "bias_buffer_reused":  # the buffer already in the pool wins over the fresh gather
            b = pool.setdefault((b.shape[0] * dist.get_world_size(),), gather(b))
        else:
            b = gather(b)
        l, u = linear_box(l, u, W, b)
        if k < len(Ws) - 1:
            l, u = F.relu(l), F.relu(u)
    return l, u


def _backward_sharded_contraction(A, W_shard):
    """``A @ W`` with ``W``'s rows sharded: the local partial product, the partials all-gathered and
    summed (less traffic than gathering ``W``; the same sum in real arithmetic, another order in
    floating point)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = W_shard.shape[0]
    part = A.narrow(-1, rank * n, n) @ W_shard
    parts = torch.empty((world * part.shape[0], *part.shape[1:]), dtype=part.dtype)
    dist.all_gather_into_tensor(parts, part.contiguous())
    return parts.view(world, *part.shape).sum(0)


def crown_fsdp(lb, ub, *shards, bug=None):
    """One FSDP rank: layer k's weight and bias all-gathered when layer k is first bounded; the CROWN
    passes then run on the full parameters (every rank computes the full bounds)."""
    Ws, bs, slopes, intercepts = [], [], [], []
    n_layers = len(shards) // 2
    for k in range(n_layers):
        Ws.append(gather(shards[2 * k]))
        bs.append(gather(shards[2 * k + 1]))
        if bug == "intermediate_ibp":  # the intermediate layers' bounds by IBP
            if 0 < k < n_layers - 1:
                lower, upper = linear_box(F.relu(lower), F.relu(upper), Ws[k], bs[k])
            else:
                lower, upper = backward_bounds(lb, ub, Ws, bs, slopes, intercepts)
        elif bug == "matmul_before_gather":
            lower, upper = _backward_bounds_gathering_partials(lb, ub, Ws, bs, shards, slopes, intercepts)
        else:
            lower, upper = backward_bounds(lb, ub, Ws, bs, slopes, intercepts)
        if k < n_layers - 1:
            s, t = relu_relaxation(lower, upper)
            slopes.append(s)
            intercepts.append(t)
    return lower, upper


def _backward_bounds_gathering_partials(lb, ub, Ws, bs, shards, slopes, intercepts):
    """`backward_bounds` with its first back-substitution (through the previous layer) computed on the
    local rows of that layer's weight, the partial products gathered (`_backward_sharded_contraction`)."""
    A = Ws[-1]
    c_lo, c_hi = bs[-1], bs[-1]
    for j in reversed(range(len(Ws) - 1)):
        t = intercepts[j].unsqueeze(-1)
        c_lo = c_lo + (A.clamp(max=0) @ t).squeeze(-1)
        c_hi = c_hi + (A.clamp(min=0) @ t).squeeze(-1)
        A = A * slopes[j].unsqueeze(1)
        bias = A @ bs[j]
        c_lo, c_hi = c_lo + bias, c_hi + bias
        if j == len(Ws) - 2:
            A = _backward_sharded_contraction(A, shards[2 * j])
        else:
            A = A @ Ws[j]
    return concretize(A, lb, ub, c_lo, c_hi)


# ---------------------------------------------------------------------------------- tensor parallel


def ibp_tp(lb, ub, W1, b1, W2, b2, *, bug=None):
    """One tensor-parallel rank: its hidden neurons' boxes (column-parallel ``W1``), their partial
    contribution to the output box (row-parallel ``W2``), all-reduced, plus the output bias."""
    l1, u1 = linear_box(lb, ub, W1, b1)  # this rank's hidden neurons: no communication
    l1, u1 = F.relu(l1), F.relu(u1)
    W2p, W2n = W2.clamp(min=0), W2.clamp(max=0)
    if bug == "negative_part_swapped":  # the positive part where the negative one is needed
        lower = l1 @ W2p.T + u1 @ W2p.T
    else:
        lower = l1 @ W2p.T + u1 @ W2n.T  # partial sums over this rank's hidden neurons
    upper = u1 @ W2p.T + l1 @ W2n.T
    dist.all_reduce(lower)
    if bug != "upper_not_reduced":
        dist.all_reduce(upper)
    return lower + b2, upper + b2


def crown_tp(lb, ub, W1, b1, W2, b2, *, bug=None):
    """One tensor-parallel rank: its hidden neurons' exact bounds and relaxation, its columns of the
    bound matrix ``A = W2`` propagated back through them, the partial ``A`` and intercepts all-reduced,
    then concretized with the input box."""
    lower1, upper1 = concretize(W1, lb, ub, b1, b1)  # this rank's hidden neurons
    if bug == "ibp_fallback":  # the sharded layer falls back to interval bounds  # gg: rank_ibp_fallback
        l1, u1 = F.relu(lower1), F.relu(upper1)
        lower = l1 @ W2.clamp(min=0).T + u1 @ W2.clamp(max=0).T
        upper = u1 @ W2.clamp(min=0).T + l1 @ W2.clamp(max=0).T
        dist.all_reduce(lower)
        dist.all_reduce(upper)
        return lower + b2, upper + b2
    slope, intercept = relu_relaxation(lower1, upper1)
    t = intercept.unsqueeze(-1)
    if bug == "negative_part_swapped":  # the positive part where the negative one is needed
        c_lo = (W2.clamp(min=0) @ t).squeeze(-1)
    else:
        c_lo = (W2.clamp(max=0) @ t).squeeze(-1)
    c_hi = (W2.clamp(min=0) @ t).squeeze(-1)
    A = W2 * slope.unsqueeze(1)  # [B, out, hidden/W]
    bias = A @ b1
    c_lo, c_hi = c_lo + bias, c_hi + bias
    A = A @ W1  # [B, out, d]: a partial sum over this rank's hidden neurons
    dist.all_reduce(c_lo)
    dist.all_reduce(c_hi)
    c_lo, c_hi = c_lo + b2, c_hi + b2
    if bug == "concretized_before_reduce":  # each rank concretizes its partial A, the bounds are summed
        zero = torch.zeros_like(c_lo)
        lower, upper = concretize(A, lb, ub, zero, zero)
        dist.all_reduce(lower)
        dist.all_reduce(upper)
        return lower + c_lo, upper + c_hi
    if bug != "A_not_reduced":
        dist.all_reduce(A)
    return concretize(A, lb, ub, c_lo, c_hi)


# ------------------------------------------------------------------------------------------ bugs

TP_BUGS = {
    "ibp": {
        b.name: b
        for b in (
            Bug("negative_part_swapped",
                "The row-parallel layer's lower bound takes the positive part W2.clamp(min=0) where the "
                "negative part is needed: l @ W+.T + u @ W+.T.", "aten.mm", "ibp_lower"),
            Bug("upper_not_reduced",
                "Only the lower bound's partial sums are all-reduced: every rank returns its own partial "
                "upper bound plus the bias.", "aten.add", "ibp_upper"),
        )
    },
    "crown": {
        b.name: b
        for b in (
            Bug("ibp_fallback",
                "The sharded layer silently falls back to interval bound propagation instead of CROWN's "
                "linear relaxation: valid bounds, but not the specification's (in general looser).", "aten.lt",
                "relaxation"),
            Bug("negative_part_swapped",
                "The lower bound's ReLU intercepts are collected with the positive part of A "
                "(A.clamp(min=0)) where the negative part is needed.", "aten.clamp", "crown_lower_intercept"),
            Bug("concretized_before_reduce",
                "Each rank concretizes its partial A with the input box and the bounds are all-reduced: the "
                "positive part of a sum is not the sum of the positive parts (valid bounds, never tighter).",
                "aten.clamp", "concretize"),
            Bug("A_not_reduced",
                "The partial bound matrix A (a sum over the ranks' hidden neurons) is never all-reduced: "
                "each rank concretizes its own partial A (the intercepts are reduced).", "aten.clamp",
                "concretize"),
        )
    },
}

FSDP_BUGS = {
    "ibp": {
        "bias_buffer_reused": Bug(
            "bias_buffer_reused",
            "The ranks keep unsharded parameters in a pool keyed by shape and skip the all-gather of a "
            "parameter whose shape is already there: the second layer adds the first layer's bias.",
            "aten.add", "ibp_lower"),
    },
    "crown": {
        "intermediate_ibp": Bug(
            "intermediate_ibp",
            "The second layer's pre-activation bounds silently fall back to interval bounds (IBP) instead "
            "of a CROWN backward pass: valid intermediate bounds, but other ones, so the final bounds differ.",
            "aten.bmm", "crown_lower_intercept"),
    },
}

# Bugs that only exact="bitwise" can see: equal to the specification in real arithmetic (proved by
# the default exact="real"), not bit for bit. Not in the registry (its tests verify in real mode).
BITWISE_BUGS = {
    "crown": {
        "matmul_before_gather": Bug(
            "matmul_before_gather",
            "The last CROWN pass multiplies A by its local rows of the previous layer's weight before any "
            "gather, all-gathers the partial products and sums them: the same value over the reals, "
            "another summation order in floating point.", "aten.mm", "crown_back"),
    },
}

# ------------------------------------------------------------------------------------------ builders


def _boxes(g, batch, d, eps, dtype, device):
    x = randn(g, batch, d, dtype=dtype, device=device)
    return x - eps, x + eps


def _layers(g, sizes, dtype, device):
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        params.append(randn(g, n_out, n_in, dtype=dtype, device=device, scale=n_in ** -0.5))
        params.append(randn(g, n_out, dtype=dtype, device=device, scale=0.3))
    return params


def _names(n_layers):
    return ("lb", "ub") + tuple(x for k in range(1, n_layers + 1) for x in (f"W{k}", f"b{k}"))


def make_fsdp(world_size: int = 2, bug: str | None = None, *, method: str = "crown", batch: int = 2,
              d: int = 4, hidden: int = 8, out: int = 4, eps: float = 0.5, seed: int = 0,
              dtype=torch.float64, device="cpu") -> Problem:
    """FSDP-style bounds of a 3-layer ReLU MLP (``method`` "ibp" or "crown")."""
    name = f"bounds_{method}_fsdp"
    check_bug(name, bug, {**FSDP_BUGS[method], **BITWISE_BUGS.get(method, {})})
    g = seeded(seed)
    lb, ub = _boxes(g, batch, d, eps, dtype, device)
    params = _layers(g, (d, hidden, hidden, out), dtype, device)
    spec, prog = {"ibp": (ibp, ibp_fsdp), "crown": (crown, crown_fsdp)}[method]
    return Problem(
        sequential=spec,
        distributed=functools.partial(prog, bug=bug),
        inputs=(lb, ub, *params),
        placements=(Replicate(), Replicate()) + (Shard(0),) * len(params),
        world_size=world_size,
        expect=(Replicate(), Replicate()),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=_names(3),
    )


def make_tp(world_size: int = 2, bug: str | None = None, *, method: str = "crown", batch: int = 2,
            d: int = 4, hidden: int = 8, out: int = 3, eps: float = 0.5, seed: int = 0,
            dtype=torch.float64, device="cpu") -> Problem:
    """Tensor-parallel bounds of a 2-layer ReLU MLP (``method`` "ibp" or "crown")."""
    name = f"bounds_{method}_tp"
    check_bug(name, bug, TP_BUGS[method])
    g = seeded(seed)
    lb, ub = _boxes(g, batch, d, eps, dtype, device)
    params = _layers(g, (d, hidden, out), dtype, device)
    spec, prog = {"ibp": (ibp, ibp_tp), "crown": (crown, crown_tp)}[method]
    return Problem(
        sequential=spec,
        distributed=functools.partial(prog, bug=bug),
        inputs=(lb, ub, *params),
        placements=(Replicate(), Replicate(), Shard(0), Shard(0), Shard(1), Replicate()),
        world_size=world_size,
        expect=(Replicate(), Replicate()),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=_names(2),
    )


make_ibp_fsdp = functools.partial(make_fsdp, method="ibp")
make_crown_fsdp = functools.partial(make_fsdp, method="crown")
make_ibp_tp = functools.partial(make_tp, method="ibp")
make_crown_tp = functools.partial(make_tp, method="crown")

EXAMPLES = [
    Example("bounds_ibp_fsdp", "Interval bound propagation through a 3-layer ReLU MLP, FSDP-style: every "
            "weight and bias sharded by rows and all-gathered right before its layer (bit for bit the "
            "specification's bounds).", make_ibp_fsdp, FSDP_BUGS["ibp"]),
    Example("bounds_crown_fsdp", "CROWN linear bounds (backward relaxation, full intermediate bounds) through a "
            "3-layer ReLU MLP, FSDP-style: parameters all-gathered when their layer is first bounded.",
            make_crown_fsdp, FSDP_BUGS["crown"]),
    Example("bounds_ibp_tp", "Interval bound propagation through a 2-layer ReLU MLP, tensor parallel: column-"
            "parallel W1/b1, row-parallel W2, partial output boxes all-reduced.", make_ibp_tp, TP_BUGS["ibp"]),
    Example("bounds_crown_tp", "CROWN linear bounds through a 2-layer ReLU MLP, tensor parallel: each rank "
            "relaxes its hidden neurons and back-substitutes its columns of A; the partial A matrices and "
            "intercepts all-reduced before concretization.", make_crown_tp, TP_BUGS["crown"]),
]
