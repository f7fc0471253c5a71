"""``op(y1[a:b], y2[a:b], ..) = op(y1, y2, ..)[a:b]``: one slice shared by every operand.

`slice-hoist` (lemmas/concat.py) takes a slice out of an operator when only that operand has a dim
mapping to the output dim. A rank that splits its shard into micro-batches (``x[step::M]``,
``x.chunk(M)``) and computes ``(xm @ w - ym) ** 2`` holds the whole ``sub(mm_m, y_m)``; the
sequential value, re-tiled into the micro-batch rows, asks for ``sub(mm_m[i:i+1], y_m[i:i+1])``:
*both* operands sliced at the same rows. ``slice-hoist-shared`` proposes the operator on the
unsliced operands, sliced afterwards, when:

* every operand with a dim that maps position-wise to output dim k is a slice along that dim,
  all at the same ``[a:b]``, of tensors of one extent along it (so the whole call lines up
  element for element with the pieces);
* operands without such a dim (broadcast along k) are used as they are;
* at least two operands are sliced (one is `slice-hoist`'s case).

Pure re-indexing: position i of the output depends only on position i of those operands, so the
identity holds bit for bit.
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.dims import dim_roles
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError


def slice_hoist_shared(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    if spec.out is not None or spec.unique is not None:
        return
    shapes = [a.shape for a in args]
    roles = dim_roles(spec, shapes, out_shape)
    if roles is None:
        return
    tried = set()
    for i, a in enumerate(args):
        if a.op != "slice":
            continue
        d, lo, hi = a.attrs
        role = roles[i][d]
        if role is None or role[0] != "out" or role in tried:
            continue
        tried.add(role)
        k = role[1]
        extent = a.args[0].shape[d]
        whole_args = []
        sliced = 0
        ok = True
        for j, b in enumerate(args):
            dj = [t for t, r in enumerate(roles[j]) if r == role]
            if not dj:
                whole_args.append(b)  # broadcast along k (or no such dim): the same for every row
                continue
            if len(dj) != 1 or b.op != "slice":
                ok = False
                break
            bd, blo, bhi = b.attrs
            if bd != dj[0] or (blo, bhi) != (lo, hi) or b.args[0].shape[bd] != extent:
                ok = False
                break
            whole_args.append(b.args[0])
            sliced += 1
        if not ok or sliced < 2:
            continue
        try:
            whole = S.call(spec, whole_args)
            if whole.shape[k] != extent:
                continue
            plan = S.slice(whole, k, lo, hi)
        except (ShapeError, IndexError):
            continue
        if tuple(plan.shape) != tuple(out_shape):
            continue
        yield plan


def _cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    F = torch.nn.functional
    for _ in range(3):
        m, n = C.dims(rng, 4, 9), C.dims(rng)
        lo = int(torch.randint(0, m // 2, (1,), generator=rng))
        hi = int(torch.randint(lo + 1, m, (1,), generator=rng))  # (< m: room for a shifted range)
        # (fn, full shapes, {operand: dim sliced}, description); a range of None slices operand 1
        # at another range (the lemma must decline: the rows do not line up)
        for fn, shapes, sl, desc in (
            (lambda a, b: a - b, ((m, n), (m, n)), {0: 0, 1: 0}, "sub, rows of both"),
            (lambda a, b: a * b, ((n, m), (n, m)), {0: 1, 1: 1}, "mul, columns of both"),
            (lambda a, b, c: torch.where(a, b, c), ((m, n, "bool"), (m, n), (m, n)), {0: 0, 1: 0, 2: 0},
             "where, rows of all three"),
            (lambda c, a, b: torch.where(c, a, b), ((n, "bool"), (m, n), (m, n)), {1: 0, 2: 0},
             "where, a broadcast condition"),
            (lambda a, b: torch.maximum(a, b), ((m, n), (m, n)), {0: 0, 1: 0}, "maximum, rows"),
            (lambda a, b: torch.lerp(a, b, 0.25), ((n, m), (n, m)), {0: 1, 1: 1}, "lerp, columns"),
            (lambda a, b: a - b, ((m, n), (m, n)), {0: 0, 1: None}, "decline: different rows"),
            (lambda a, b: a - b, ((m, n), (m, n)), {0: 0, 1: "fresh"}, "decline: one operand not sliced"),
        ):
            tensors = tuple(r(*s[:-1]) > 0 if s[-1] == "bool" else r(*s) for s in shapes)
            spec, order = C.spec_of(fn, *tensors)
            case = C.make_case(spec, [tensors[o] for o in order], rng)
            args = list(case.args)
            for o, d in sl.items():
                slot = order.index(o) if o in order else None
                if slot is None:
                    continue
                if d is None:
                    args[slot] = case.store.slice(args[slot], 0, lo + 1, hi + 1)
                elif d == "fresh":  # an atom of the sliced shape, not a slice
                    case.values["fresh"] = r(hi - lo, n)
                    args[slot] = case.store.atom("fresh", (hi - lo, n), torch.float64)
                else:
                    args[slot] = case.store.slice(args[slot], d, lo, hi)
            yield type(case)(spec, tuple(args), case.values, case.store, desc)
        # float32, and adversarial values (zeros, +-inf, nan: a re-indexing keeps them all)
        a, b = r(m, n).float(), r(m, n).float()
        a[0, 0], b[0, 0], a[-1, -1] = 0.0, float("inf"), float("nan")
        spec, order = C.spec_of(lambda a, b: a * b, a, b)
        case = C.make_case(spec, [(a, b)[o] for o in order], rng)
        args = tuple(case.store.slice(x, 0, lo, hi) for x in case.args)
        yield type(case)(spec, args, case.values, case.store, "float32 mul with 0, inf, nan")


register(Lemma(
    name="slice-hoist-shared",
    statement="op(y1[a:b along d1], y2[a:b along d2], ..) = op(y1, y2, ..)[a:b along k]  when every operand "
              "with a dim mapping position-wise to output dim k is sliced at [a:b] along it",
    kinds=("ew", "matmul", "reduce", "softmax", "layer_norm", "embedding"),
    plans=slice_hoist_shared,
    cases=_cases,
    conditions=("every operand with a dim mapping to output dim k is a slice along it at the same [a:b]",
                "the sliced tensors have one extent along that dim", "at least two operands are sliced"),
    bitwise_safe=True,
    priority=36,
))
