"""A batch-1 ``bmm`` is an ``mm`` of its two matrices, viewed back.

The lowering (ir/lower.py ``single_bmm``) writes every batch-1 ``bmm`` a program runs as ``mm`` of
the squeezed operands (one form for ``einsum``, ``x @ w.t()``, ``F.linear``). A sequential
``bmm`` over ``[batch*heads]`` split into batch-1 pieces (one head per rank: Ulysses with as many
heads as ranks) then asks for a batch-1 ``bmm`` that no rank computes in that form;
``batch1-bmm-as-mm`` rewrites it into the ``mm`` the ranks do compute.
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.relations.expr import Expr, ExprStore, OpSpec, ShapeError, Slot

aten = torch.ops.aten
MM = OpSpec("matmul", str(aten.mm.default), aten.mm.default, ((Slot(0), Slot(1)), ()), (("einsum", "ik,kj->ij"),))


def as_mm(S: ExprStore, spec: OpSpec, args) -> "Expr | None":
    """``bmm(a, b)`` of two batch-1 operands as ``view(mm(a[0], b[0]), (1, m, n))``, the form the
    lowering gives it (None when ``spec``/``args`` are not that)."""
    if spec.target is not aten.bmm.default or len(args) != 2 or spec.unique is not None:
        return None
    a, b = args
    if len(a.shape) != 3 or len(b.shape) != 3 or a.shape[0] != 1 or b.shape[0] != 1 or a.dtype != b.dtype:
        return None
    try:
        prod = S.call(MM, [S.view(a, tuple(a.shape[1:])), S.view(b, tuple(b.shape[1:]))])
        return S.view(prod, (1,) + tuple(prod.shape))
    except ShapeError:
        return None


def batch1_bmm_as_mm(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    t = as_mm(S, spec, args)
    if t is not None and tuple(t.shape) == tuple(out_shape):
        yield t


def _cases(rng):
    # the bmm spec as a program with a batch > 1 has it (the lowering writes a batch-1 bmm as mm)
    spec, _ = C.spec_of(torch.bmm, C.randn(rng, 2, 3, 4), C.randn(rng, 2, 4, 2))
    for k in range(4):
        m, n, p = C.dims(rng, 1, 5), C.dims(rng, 1, 5), C.dims(rng, 1, 5)
        dtype = torch.float32 if k == 3 else torch.float64
        a, b = C.randn(rng, 1, m, n, dtype=dtype), C.randn(rng, 1, n, p, dtype=dtype)
        yield C.make_case(spec, (a, b), rng, description=f"batch-1 bmm {m}x{n}x{p} {dtype}")
    yield C.make_case(spec, (C.randn(rng, 2, 3, 4), C.randn(rng, 2, 4, 2)), rng, description="batch 2 (declines)")


register(Lemma(
    name="batch1-bmm-as-mm",
    statement="bmm(a, b) = view(mm(a.view(m, k), b.view(k, n)), (1, m, n)) for a: [1, m, k], b: [1, k, n]",
    kinds=("matmul",),
    plans=batch1_bmm_as_mm,
    cases=_cases,
    conditions=("both operands have batch size 1", "same dtype"),
    priority=60,
    on=((aten.bmm.default, (), ()),),
))
