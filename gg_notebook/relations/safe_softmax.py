"""``_safe_softmax`` is ``softmax`` when no row is entirely masked (a term normal form, reals only).

PyTorch's math form of ``F.scaled_dot_product_attention`` with an ``attn_mask`` normalizes with
``_safe_softmax``: a softmax whose rows that are entirely -inf give zeros instead of NaN, decomposed
(ir/decompose.py) as ``masked_fill(softmax(x, d), all(x == -inf, d, keepdim), 0.0)`` (``all`` is
lowered as ``amin``). A spec written with a plain softmax (or SDPA without a mask, decomposed with
one) holds ``softmax(x, d)``. The two are the same value when no row of ``x`` along ``d`` is entirely
-inf, which `rows_never_all_neg_inf` decides conservatively:

* ``x`` has no non-finite constant anywhere in its term (over the reals every other value is
  finite), or
* ``x`` is a masked tensor (``y + M`` with M in {0, -inf}, ``masked_fill(y, B, -inf)``, ``where``:
  lemmas/attn_mask.py) whose effective mask leaves at least one position of every row unmasked, with
  ``y`` as in the first case.

Then `canonical_safe_softmax` interns the masked_fill as the softmax term itself. Only with
``store.real`` (exact="real"): a finite float computation may still overflow to -inf.
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten


def _finite_terms(store, t) -> bool:
    """No ground value with a non-finite element (and no opaque constant) in ``t``'s term."""
    from gg_notebook.relations.ground import value_of

    memo = store.__dict__.setdefault("_finite_terms", {})
    stack, seen = [(t, False)], set()
    while stack:  # post-order over the DAG, each term once (else paths are enumerated)
        x, done = stack.pop()
        if done:
            memo[x.id] = all(memo.get(a.id, False) for a in x.args)
            continue
        if x.id in memo or x.id in seen:
            continue
        seen.add(x.id)
        if x.ground:
            v = value_of(x)
            ok = v is not None and (not (v.dtype.is_floating_point or v.is_complex()) or bool(torch.isfinite(v).all()))
            memo[x.id] = ok
            continue
        stack.append((x, True))
        stack.extend((a, False) for a in x.args if a.id not in memo)
    return memo[t.id]


def rows_never_all_neg_inf(store, x, d: int) -> bool:
    if _finite_terms(store, x):
        return True
    if x.op != "call":
        return False
    from gg_notebook.lemmas.attn_mask import decode
    from gg_notebook.relations.ground import value_of

    hit = decode(x.attrs, x.args, x.shape, x.dtype, value_of)
    if hit is None:
        return False
    xi, mask = hit
    if not _finite_terms(store, x.args[xi]):
        return False
    full = torch.broadcast_to(mask, tuple(x.shape))
    return not bool(full.all(dim=d).any())


def canonical_safe_softmax(store, spec, args):
    """The softmax term for ``masked_fill(softmax(x, d), all(x == -inf, d, keepdim=True), 0.0)`` when no
    row of x is entirely -inf; else None."""
    if not getattr(store, "real", False) or spec.target is not aten.masked_fill.Scalar or len(args) != 2:
        return None
    si, mi = spec.slot_of("self"), spec.slot_of("mask")
    value = spec.arg("value", None)
    if si is None or mi is None or not isinstance(value, (int, float)) or isinstance(value, bool) or value != 0:
        return None
    sm, m = args[si], args[mi]
    if sm.op != "call" or sm.attrs.target is not aten._softmax.default or sm.attrs.arg("half_to_float") is not False:
        return None
    x = sm.args[0]
    nd = len(x.shape)
    d = int(sm.attrs.arg("dim")) % max(nd, 1)
    if m.op != "call" or m.attrs.target is not aten.amin.default or m.attrs.arg("keepdim") is not True:
        return None
    dims = m.attrs.arg("dim")
    if [int(k) % nd for k in dims] != [d]:
        return None
    e = m.args[0]
    if e.op != "call" or e.attrs.target is not aten.eq.Scalar or e.args[0].id != x.id:
        return None
    other = e.attrs.arg("other", None)
    if not (isinstance(other, float) and math.isinf(other) and other < 0):
        return None
    if tuple(sm.shape) != tuple(x.shape) or sm.dtype != x.dtype:
        return None
    return sm if rows_never_all_neg_inf(store, x, d) else None
