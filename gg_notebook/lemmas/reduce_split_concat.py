"""A reduction over half of a split concatenated dim: the gradient of a head repetition.

GQA repeats each key/value head for the query heads of its group (``repeat_interleave``); its gradient
views the heads dim as ``(groups, repeats)`` and sums the repeats. When every head is computed by another
rank, the heads dim is a concatenation of the ranks' pieces::

    sum(view(concat(x_0..x_{n-1}, d), (.., A, B, ..)), B)  =  concat_i( sum_{k in G_i} view(x_k, (.., 1, p, ..)) reduced, A)

``reduce-split-concat``: the dim ``d`` of ``concat`` (n pieces of size p each, p dividing B) is viewed as
two dims ``(A, B)``; the op reduces ``B`` and keeps ``A``. Piece k lies in row ``i = k p // B`` of ``A``, so
the reduction is, per row i, the combination (sum / max / min) of the pieces' own reductions, and the
rows concatenate along ``A``'s output dim. A piece whose reduced dims all have size 1 is its own
reduction (a view). Sums are regrouped (equal over the reals); max/min are exact.
"""

from __future__ import annotations

import math

import torch

from gg_notebook.ir.specs import reduced_dims
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError, reshape_groups

aten = torch.ops.aten
_FN = {aten.sum.dim_IntList: "sum", aten.amax.default: "max", aten.amin.default: "min"}


def reduce_split_concat(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    fn = _FN.get(spec.target)
    if fn is None or len(args) != 1 or spec.out is not None:
        return
    a = args[0]
    if a.op != "view" or a.args[0].op != "cat" or a.dtype is None or a.dtype == torch.bool:
        return
    if fn == "sum" and spec.arg("dtype", None) not in (None, a.dtype):
        return
    X = a.args[0]
    d = X.attrs
    pieces = X.args
    p = pieces[0].shape[d]
    if len(pieces) < 2 or any(x.shape[d] != p for x in pieces) or p == 0:
        return
    groups = reshape_groups(tuple(X.shape), tuple(a.shape))
    if groups is None:
        return
    grp = next(((gi, go) for gi, go in groups if d in gi), None)
    if grp is None:
        return
    gi, go = grp
    if [t for t in gi if X.shape[t] != 1] != [d] or len([o for o in go if a.shape[o] != 1]) != 2:
        return
    m1, m2 = [o for o in go if a.shape[o] != 1]
    A, B = a.shape[m1], a.shape[m2]
    dims = reduced_dims(spec.arg("dim"), len(a.shape))
    keepdim = bool(spec.arg("keepdim", False))
    if m2 not in dims or m1 in dims or B % p:
        return
    out_m1 = m1 if keepdim else m1 - sum(1 for t in dims if t < m1)
    piece_shape = list(a.shape)
    piece_shape[m1], piece_shape[m2] = 1, p
    try:
        rows: list[list] = [[] for _ in range(A)]
        for k, x in enumerate(pieces):
            v = S.view(x, tuple(piece_shape))
            if all(piece_shape[t] == 1 for t in dims) and (fn != "sum" or spec.arg("dtype", None) is None):
                out = list(piece_shape) if keepdim else [s for t, s in enumerate(piece_shape) if t not in dims]
                r = S.view(v, tuple(out))  # one element per reduction: the element itself
            else:
                r = S.call(spec, [v])
            rows[(k * p) // B].append(r)
        parts = [row[0] if len(row) == 1 else S.accum(fn, row) for row in rows]
        yield S.cat(parts, out_m1)
    except ShapeError:
        return


def _case(rng, fn, heads: int, view: tuple, n_pieces: int, description: str):
    """``fn(view(concat(x_0..x_{n-1}, 1), view))`` with equal pieces along the heads dim (dim 1)."""
    from gg_notebook.lemmas.base import LemmaCase

    b, h = view[0], view[-1]
    x = C.randn(rng, b, heads, h)
    spec, _ = C.spec_of(fn, x.view(view))
    S = ExprStore()
    values, atoms = {}, []
    for k, piece in enumerate(torch.chunk(x, n_pieces, 1)):
        values[f"a0_{k}"] = piece.clone()
        atoms.append(S.atom(f"a0_{k}", tuple(piece.shape), piece.dtype))
    return LemmaCase(spec, (S.view(S.cat(atoms, 1), view),), values, S, description)


def _cases(rng):
    for _ in range(3):
        b, h = C.dims(rng), C.dims(rng, 2, 5)
        yield _case(rng, lambda v: v.sum(2), 4, (b, 2, 2, h), 4,
                    "repeat_interleave backward: heads split one per piece, repeats summed")
        yield _case(rng, lambda v: v.sum(2, keepdim=True), 4, (b, 2, 2, h), 4, "keepdim")
        yield _case(rng, lambda v: v.sum([2, 3]), 8, (b, 2, 4, h), 4, "pieces of 2 heads, several dims reduced")
        yield _case(rng, lambda v: v.amax(2), 8, (b, 2, 4, h), 8, "amax over the repeats")
        yield _case(rng, lambda v: v.sum(1), 4, (b, 2, 2, h), 4, "the outer half reduced: declines")


register(Lemma(
    name="reduce-split-concat",
    statement="red(view(concat(x_k, d), (.., A, B, ..)), B) = concat_i(acc_{k in row i} red(view(x_k, (.., 1, p, ..)), B), A)",
    kinds=("reduce",),
    plans=reduce_split_concat,
    cases=_cases,
    conditions=("the concatenated dim is viewed as two dims (A, B); B is reduced, A kept",
                "equal pieces whose size divides B", "sum (no dtype change), amax or amin"),
    bitwise_safe=False,
    priority=36,
))
