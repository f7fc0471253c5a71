"""Operators on merged dims: ``bmm`` over ``[batch*heads, ...]`` when the heads are sharded.

Attention merges ``[B, heads, S, D]`` into ``[B*heads, S, D]`` before ``bmm``. A concatenation
along heads is not a concatenation along the merged dim (the batch index is outermost), so
``concat-commute`` cannot see it. ``merged-batch`` unmerges every operand whose dim maps
position-wise to the same output dim, applies the op per piece of the inner (sharded) factor,
and merges back:

    op(view(concat_h(x_i), [B*H, ..]), ..) = view(concat_h(view(op(view(x_i, [B*h_i, ..]), ..), [B, h_i, ..])), [B*H, ..])
"""

from __future__ import annotations

import math

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.concat import cat_bounds
from gg_notebook.lemmas.dims import dim_roles
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError, reshape_groups


def merged_batch(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    shapes = [a.shape for a in args]
    roles = dim_roles(spec, shapes, out_shape)
    if roles is None:
        return
    tried = set()
    for i, a in enumerate(args):
        if a.op != "view" or a.args[0].op != "cat":
            continue
        X = a.args[0]
        d = X.attrs
        groups = reshape_groups(X.shape, a.shape)
        if groups is None:
            continue
        grp = next(((gi, go) for gi, go in groups if d in gi), None)
        if grp is None:
            continue
        in_dims, out_dims = grp
        out_dims = [o for o in out_dims if a.shape[o] != 1] or out_dims
        if len(out_dims) != 1:
            continue
        m = out_dims[0]
        role = roles[i][m]
        if role is None or role[0] != "out":
            continue
        k = role[1]
        in_dims = [t for t in in_dims if X.shape[t] != 1 or t == d]
        in_sizes = [X.shape[t] for t in in_dims]
        q = in_dims.index(d)
        if q == 0 or math.prod(in_sizes) != a.shape[m]:
            continue  # outermost: plain concat-commute handles it
        if (k, tuple(in_sizes), q) in tried:
            continue
        tried.add((k, tuple(in_sizes), q))
        bounds = cat_bounds(X)
        try:
            pieces = []
            for lo, hi in bounds:
                h = hi - lo
                new_args = []
                for j, b in enumerate(args):
                    mj = [t for t, r in enumerate(roles[j]) if r == ("out", k)]
                    if not mj:
                        new_args.append(b)
                        continue
                    mj = mj[0]
                    if b.shape[mj] != a.shape[m]:
                        raise ShapeError("operands disagree on the merged dim")
                    unmerged = list(b.shape[:mj]) + in_sizes + list(b.shape[mj + 1:])
                    ub = S.view(b, unmerged)
                    sb = S.slice(ub, mj + q, lo, hi)
                    merged = list(b.shape)
                    merged[mj] = b.shape[mj] // in_sizes[q] * h
                    new_args.append(S.view(sb, merged))
                piece = S.call(spec, new_args)
                sizes = list(in_sizes)
                sizes[q] = h
                unmerged_out = list(piece.shape[:k]) + sizes + list(piece.shape[k + 1:])
                pieces.append(S.view(piece, unmerged_out))
            yield S.view(S.cat(pieces, k + q), out_shape)
        except ShapeError:
            continue


def _cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    for _ in range(3):
        b, h, s, dd = C.dims(rng, 2, 4), C.dims(rng, 2, 6), C.dims(rng), C.dims(rng)
        q, k = r(b, h, s, dd), r(b, h, dd, s)

        def bmm_merged(q, k, b=b, h=h, s=s, dd=dd):
            return torch.bmm(q.reshape(b * h, s, dd), k.reshape(b * h, dd, s))

        spec, order = C.spec_of(lambda x, y: torch.bmm(x, y), r(b * h, s, dd), r(b * h, dd, s))
        S_ = None
        case = C.make_case(spec, (q, k), rng, split={0: 1, 1: 1})
        S_ = case.store
        # wrap the split operands in the merging views, as attention code does
        args = (S_.view(case.args[0], (b * h, s, dd)), S_.view(case.args[1], (b * h, dd, s)))
        yield type(case)(spec, args, case.values, S_, "bmm over merged batch*heads, heads split")
        x, y = r(b, h, s), r(b, h, s)
        spec, _ = C.spec_of(lambda x, y: x * y, r(b * h, s), r(b * h, s))
        case = C.make_case(spec, (x, y), rng, split={0: 1})
        S_ = case.store
        args = (S_.view(case.args[0], (b * h, s)), S_.view(case.args[1], (b * h, s)))
        yield type(case)(spec, args, case.values, S_, "mul over merged dims, one side split")


register(Lemma(
    name="merged-batch",
    statement="op(view(concat_d(x_i), merged), ..) = view(concat_d(view(op(view(x_i, merged_i), ..), unmerged_i)), ..)",
    kinds=("ew", "matmul", "softmax", "softmax_backward", "reduce"),
    plans=merged_batch,
    cases=_cases,
    conditions=("the merged dim maps position-wise to one output dim for every operand",
                "the concatenated dim is an inner factor of the merged dim"),
    bitwise_safe=True,
    priority=25,
))
