"""A reduction over whole groups of dims does not care how those dims are grouped.

``x.view(b * s, h).sum(0)`` and ``x.sum((0, 1))`` are one value: the gradient of a bias added by
``F.linear`` to a ``[b, s, h]`` input (flattened to 2-D by ``addmm``) versus the same bias added to
the 3-D tensor (Megatron's ``RowParallelLinear``: ``all_reduce(x @ w.t()) + bias``), and a loss
averaged over ``[b * s]`` tokens versus over ``[b, s]``.

``reduce-regroup`` proposes, for ``reduce(view(y), dims)``, the reduction of ``y`` over the dims of
the view groups that ``dims`` covers whole (then viewed to the output shape), and for a reduction
over a contiguous run of dims, the reduction of the view that merges that run into one dim. It
declines when a view group is only partly reduced (a view that mixes reduced and kept elements).
"""

from __future__ import annotations

import torch

from gg_notebook.ir.specs import reduce_spec
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError, reshape_groups

aten = torch.ops.aten
_FNS = ("sum", "mean", "amax", "amin")


def _reduced_dims(spec: OpSpec, nd: int):
    if spec.param("fn") not in _FNS or spec.param("keepdim") not in (True, False) or spec.out is not None:
        return None
    dims = spec.param("dims")
    if not dims or nd == 0:
        return None  # an empty dim list reduces everything: not a regrouping question
    return sorted({int(d) % nd for d in dims})


def reduce_regroup(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    if len(args) != 1:
        return
    x = args[0]
    red = _reduced_dims(spec, len(x.shape))
    if red is None:
        return
    fn, dtype, keep = spec.param("fn"), spec.arg("dtype", None), spec.param("keepdim")
    # (a) reduce(view(y), dims) = view(reduce(y, dims of the groups dims covers), out_shape)
    if x.op == "view":
        y = x.args[0]
        groups = reshape_groups(y.shape, x.shape)
        if groups is not None:
            ydims, ok = [], True
            for gi, go in groups:
                hit = [o for o in go if o in red]
                if not hit:
                    continue
                if len(hit) != len(go) and any(x.shape[o] != 1 for o in go if o not in hit):
                    ok = False  # the view mixes reduced and kept elements
                    break
                ydims += gi
            if ok and ydims:
                try:
                    yield S.view(S.call(reduce_spec(fn, tuple(ydims), keep, dtype), [y]), out_shape)
                except ShapeError:
                    pass
    # (b) a reduction over a contiguous run of dims = the reduction of the view merging that run
    if len(red) >= 2 and red == list(range(red[0], red[-1] + 1)):
        lo, hi = red[0], red[-1] + 1
        merged = tuple(x.shape[:lo]) + (int(torch.tensor(x.shape[lo:hi]).prod()),) + tuple(x.shape[hi:])
        try:
            yield S.view(S.call(reduce_spec(fn, (lo,), keep, dtype), [S.view(x, merged)]), out_shape)
        except ShapeError:
            return


def _cases(rng):
    for k in range(3):
        a, b, c = C.dims(rng), C.dims(rng), C.dims(rng)
        x = C.randn(rng, a, b, c)
        fn = ("sum", "mean", "amax")[k]
        red = getattr(torch, fn)
        # (a): the spec reduces dim 0 of a 2-D value, applied to a 3-D atom viewed as 2-D
        keep = k == 1
        spec, _ = C.spec_of(lambda y, red=red: red(y, 0, keepdim=keep), x.reshape(a * b, c))
        case = C.make_case(spec, (x,), rng, description=f"{fn} over a view merging the leading dims")
        yield type(case)(spec, (case.store.view(case.args[0], (a * b, c)),), case.values, case.store,
                         case.description)
        # (b): reductions over runs of dims of a 3-D atom
        for f, desc in ((lambda x, red=red: red(x, (0, 1)), "two leading dims"),
                        (lambda x, red=red: red(x, (-2, -1), keepdim=True), "two trailing dims, keepdim")):
            yield C.case(f, (x,), rng, description=f"{fn} over the {desc}")


register(Lemma(
    name="reduce-regroup",
    statement="reduce(view(y), dims) = view(reduce(y, dims'), out) when dims cover whole view groups;"
              " reduce(x, d..e) = reduce(view merging d..e, d)",
    kinds=("reduce",),
    plans=reduce_regroup,
    cases=_cases,
    conditions=("sum / mean / amax / amin (keepdim or not: the result is viewed to the output shape)",
                "every view group the reduction touches is reduced whole (size-1 dims aside)",
                "a merged run of dims is contiguous"),
    bitwise_safe=False,
    priority=45,
    on=((aten.sum.dim_IntList, ("dim", "keepdim"), ("dtype",)),
        (aten.mean.dim, ("dim", "keepdim"), ("dtype",)),
        (aten.amax.default, ("dim", "keepdim"), ()),
        (aten.amin.default, ("dim", "keepdim"), ())),
))
