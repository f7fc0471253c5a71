"""The gradient of a vocabulary-parallel cross-entropy as autograd writes it for a written-out loss.

``vocab-cross-entropy-backward`` relates ``d logits`` of ``F.cross_entropy`` to ``(softmax_r -
onehot_r(t)) * G`` per vocabulary shard (Megatron's hand-written backward, or the gradient written
out by hand). A rank that writes the *forward* out (max all-reduce, ``exp``, sum all-reduce,
``log``, a masked ``gather`` of the target logit) and lets autograd differentiate it gets the two
terms separately and adds them::

    d x_r = scatter_add(0, idx, -G * in_shard)  +  exp(x_r - m) * (G / sum_exp)

(the ``gather``'s backward, then the ``exp``'s; autograd accumulates with ``add``). `split_plans`
proposes that sum: the first term is the synthetic `ScaledOnehot` (``-G`` at the in-shard target
id, 0 elsewhere), matched by an exhaustive check over the target domain; the second is a
`real_value` ``G * exp(x_r - LSE(x))`` (its stabilizer and normalizer cancel in the real normal
form). ``G`` is the input-independent factor of ``torch.autograd.grad(loss)`` (``1 / N`` for a
mean, ``1`` for a sum), compared by value.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from gg_notebook.ir.specs import ew_spec, reduce_spec
from gg_notebook.lemmas.base import register_matcher
from gg_notebook.lemmas.domain import eval_on_domain
from gg_notebook.lemmas.realform import real_value
from gg_notebook.relations.domains import IdDomain
from gg_notebook.relations.expr import Expr, OpSpec, Slot

aten = torch.ops.aten


@dataclass(frozen=True)
class ScaledOnehot:
    """``-g`` at the column ``t - start`` of rows whose target falls in ``[start, start + width)``,
    0 elsewhere: shape ``t.shape + (width,)``, ``g``'s dtype (``g`` a 0-dim or broadcastable factor)."""

    start: int
    width: int

    def __call__(self, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        local = t - self.start
        inside = (local >= 0) & (local < self.width)
        hot = (local.unsqueeze(-1) == torch.arange(self.width, device=t.device)) & inside.unsqueeze(-1)
        return torch.where(hot, -g, torch.zeros((), dtype=g.dtype, device=g.device))


def scaled_onehot_spec(start: int, width: int, domain: IdDomain, ignore: int | None = None) -> OpSpec:
    """``ignore``: the plan zeroes the rows whose target is ``ignore`` afterwards (ce_ignore.py), so
    the matcher takes those rows as don't-care."""
    params = (("start", start), ("width", width), ("domain", domain), ("blame", "consumer"))
    if ignore is not None:
        params += (("ignore", ignore),)
    return OpSpec("scaled_onehot", f"scaled_onehot[{start}:+{width}]" + ("" if ignore is None else f"~{ignore}"),
                  ScaledOnehot(start, width), ((Slot(0), Slot(1)), ()), params)


def split_plans(S, pieces, lead, plast, g_row, domain, t, out_shape):
    """``cat_r(scaled_onehot_r(t, G) + G exp(x_r - LSE(x)))`` (both orders of the sum) for an
    input-independent ``g_row`` (``G`` viewed ``lead + (1,)``-broadcastable)."""
    n = len(pieces)
    vocab = sum(p.shape[-1] for p in pieces)
    add = ew_spec(aten.add.Tensor, 2)
    g0 = S.view(g_row, ()) if all(s == 1 for s in g_row.shape) else None
    if g0 is None:
        return

    def soft_builder(r):
        def build(S_, h):
            lse = S_.call(reduce_spec("logsumexp", (plast,), True), [S_.cat(h[:n], plast)])
            e = S_.call(ew_spec(aten.exp.default, 1), [S_.call(ew_spec(aten.sub.Tensor, 2), [h[r], lse])])
            return S_.call(ew_spec(aten.mul.Tensor, 2), [e, h[n]])
        return build

    for order in (0, 1):
        outs, off = [], 0
        for r, p in enumerate(pieces):
            hot = S.call(scaled_onehot_spec(off, p.shape[-1], domain), [t, g0])
            soft = real_value(S, list(pieces) + [g_row], soft_builder(r), "G * softmax piece")
            outs.append(S.call(add, [hot, soft] if order == 0 else [soft, hot]))
            off += p.shape[-1]
        yield S.view(S.cat(outs, plast), out_shape)
    _ = vocab


def _uniform_fill(e: Expr):
    """The fill of ``e`` read without building a tensor of its shape, when it is a uniform constant
    (a ``full`` factory, or a value node whose bytes are all equal) under views / expands / slices /
    permutes (each keeps a uniform tensor uniform, in its dtype). None: not of that form (the caller
    evaluates), or NaN (never equal to itself)."""
    from gg_notebook.ir.lower import _Full, untyped
    from gg_notebook.relations.ground import Value

    x = e
    while x.op in ("view", "expand", "slice", "permute"):
        x = x.args[0]
    t = getattr(x.attrs, "target", None) if x.op == "const" else None
    if x.dtype != e.dtype or math.prod(e.shape) == 0:
        return None
    if isinstance(t, _Full) and t.dtype == e.dtype:
        v = torch.full((), untyped(t.value), dtype=t.dtype)  # as `_Full` itself evaluates
    elif isinstance(t, Value) and t.uniform and t.dtype == e.dtype and t.tensor.numel():
        v = t.tensor[(0,) * t.tensor.dim()].clone()  # one element: no copy of an expanded tensor
    else:
        return None
    return None if bool(torch.isnan(v)) else v


def _uniform(e: Expr):
    from gg_notebook.lemmas.loss_reduce import ground_value

    fast = _uniform_fill(e)
    if fast is not None:
        return fast
    v = ground_value(e)
    if v is None or v.numel() == 0:
        return None
    flat = v.reshape(-1)
    return flat[0] if bool((flat == flat[0]).all()) else None


def match_scaled_onehot(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """A rank value ``scatter_add(0, idx[..., None], vals[..., None])`` along the last dim with, on
    every id of the domain, ``idx`` = the in-shard column for in-shard ids and any valid column
    otherwise, and ``vals`` = ``-G`` for in-shard ids and 0 otherwise."""
    t_rel, g_rel = args
    t_t = engine.to_term(t_rel)
    g = _uniform(engine.to_term(g_rel))
    if g is None:
        return None
    start, width = spec.param("start"), spec.param("width")
    domain = spec.param("domain").values(t_rel.dtype)
    local = domain - start
    inside = (local >= 0) & (local < width)
    ignore = spec.param("ignore", None)
    rel = domain != ignore if ignore is not None else torch.ones_like(inside)  # rows that matter
    index = engine.index
    lead = tuple(t_t.shape)
    shape = lead + (width,)
    base = t_t
    while base.op == "view":
        base = base.args[0]
    frontier, seen = [base], set()
    for _ in range(6):  # the index and value terms are a few elementwise operators of the targets
        nxt = []
        for e in frontier:
            for u in index.users_of(e):
                if u.id in seen:
                    continue
                seen.add(u.id)
                if u.op == "view" or (u.op == "call" and (u.attrs.kind == "ew" or (
                        u.attrs.target is aten.index_put.default and tuple(u.shape) == tuple(e.shape)))):
                    nxt.append(u)  # (x[mask] = v: elementwise for a mask of x's shape)
                if u.op == "call" and u.attrs.target is aten.index_put.default and len(u.args) == 4:
                    if _index_put_onehot(u, shape, lead, base, domain, width, inside, local, rel, g):
                        d = index.realized(u)
                        if d is not None:
                            return index.ref(d)
                    continue
                if u.op != "call" or u.attrs.target is not aten.scatter_add.default or len(u.args) != 3:
                    continue
                if tuple(u.shape) != shape or u.attrs.arg("dim") not in (-1, len(shape) - 1):
                    continue
                zeros, idx, vals = u.args
                z = _uniform(zeros)
                if z is None or float(z) != 0.0 or u.dtype != g.dtype:
                    continue
                if tuple(idx.shape) != lead + (1,) or tuple(vals.shape) != lead + (1,):
                    continue
                iv = eval_on_domain(idx, base, domain)
                vv = eval_on_domain(vals, base, domain)
                if iv is None or vv is None or vv.dtype != g.dtype:
                    continue
                if not bool(((iv >= 0) & (iv < width)).all()) or not bool((iv[inside & rel] == local[inside & rel]).all()):
                    continue
                want = torch.where(inside, -g, torch.zeros((), dtype=g.dtype))
                if not torch.equal(vv[rel], want[rel]):
                    continue
                d = index.realized(u)
                if d is not None:
                    return index.ref(d)
        frontier = nxt
    return None


def _index_put_onehot(u, shape, lead, base, domain, width, inside, local, rel, g) -> bool:
    """``u`` = ``zeros[arange(n), J] = V`` (index_put, no accumulation, one entry per row) with, on
    every id that matters, ``J`` the in-shard column (any valid column otherwise) and ``V`` = ``-g``
    in shard, 0 outside: torchtitan's ``grad_input[row_idx, local_labels] = out_of_range - 1``."""
    if tuple(u.shape) != shape or len(shape) != 2 or u.attrs.arg("accumulate") is not False:
        return False
    zeros, rows, cols, vals = u.args
    z = _uniform(zeros)
    if z is None or float(z) != 0.0 or u.dtype != g.dtype:
        return False
    n = shape[0]
    if rows.op != "const" or tuple(rows.shape) != (n,) or not torch.equal(rows.attrs.call([]), torch.arange(n)):
        return False
    if tuple(cols.shape) != (n,) or tuple(vals.shape) not in ((n,), ()):
        return False
    iv = eval_on_domain(cols, base, domain)
    vv = eval_on_domain(vals, base, domain)
    if iv is None or vv is None or vv.dtype != g.dtype or tuple(iv.shape) != tuple(domain.shape):
        return False
    if tuple(vv.shape) != tuple(domain.shape):
        return False
    if not bool(((iv >= 0) & (iv < width)).all()) or not bool((iv[inside & rel] == local[inside & rel]).all()):
        return False
    want = torch.where(inside, -g, torch.zeros((), dtype=g.dtype))
    return torch.equal(vv[rel], want[rel])


register_matcher("scaled_onehot", match_scaled_onehot)
