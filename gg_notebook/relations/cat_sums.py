"""A concatenation of reductions is the reduction of the concatenations, when those re-form whole
values: ``cat(sum(A[0:1], B[0:1]), sum(A[1:2], B[1:2])) = sum(A, B)``.

Megatron's scatter-gather pipeline send: stage 0's tensor-parallel all-reduce is ``sum(A, B)`` (``A``,
``B`` the TP ranks' partial products); each TP rank sends only its slice of it and the next stage
all-gathers the slices in its TP group. The index interns the gathered value as the concatenation
of the slices, each the slice of the reduction, i.e. ``cat(sum(A[0:1], B[0:1]), sum(A[1:2], B[1:2]))``
(or, flattened and viewed back, views of row slices; or transposed for a weight gradient,
``cat(sum(view(A[0:1], (n, 1)), ..), .., dim=1)``). `ExprStore.cat` calls `cat_of_accums`, so that
value is the term ``sum(A, B)`` (resp. ``sum(A.T, B.T)``) itself: the same node as stage 0's
all-reduce, found by every structural lookup.

The rule, for ``cat(accum_f(b_11, .., b_1k), .., accum_f(b_n1, .., b_nk), dim=d)`` (one reduction
``f`` in {sum, max, min}, k operands in every piece):

* column ``j`` (the j-th operand of every piece) is a chain of ``view``/``permute``/``slice`` over
  one opaque node, its *root* ``R_j``;
* ``cat(b_1j, .., b_nj, dim=d)`` moves every element of ``R_j`` exactly once (decided on index
  tensors: ``R_j`` holds ``0 .. numel-1``; no gap, no overlap, nothing of another node) and in the
  order of ``view(permute(R_j, p), shape)`` for some permutation ``p`` (the identity tried first);
  its term is then that movement ``C_j``.

Then the value is ``accum_f(C_1, .., C_k)``: every element accumulates the same operands in the same
order on both sides (the identity holds bit for bit). Otherwise the rule declines (the
concatenation is kept). Cheap to reject: only when every piece is an accumulation with the same
operand count, and index tensors only up to ``MAX_NUMEL`` elements.
"""

from __future__ import annotations

import itertools
import math

import torch

from gg_notebook.relations.expr import Expr, ShapeError, apply_op

MAX_NUMEL = 1 << 20  # index tensors of at most this many elements (else: decline), as relations/movement.py
MAX_RANK = 4  # roots of at most this many dims (4! permutations tried at most)
_MOVES = ("view", "permute", "slice")


def _root(b: Expr) -> Expr:
    while b.op in _MOVES:
        b = b.args[0]
    return b


def _index_tensor(e: Expr, root: Expr, memo: dict) -> torch.Tensor | None:
    """``e`` (a view/permute/slice/cat chain over ``root``) evaluated with ``root`` holding
    ``arange(numel)``; None if it reads any other node."""
    hit = memo.get(e.id)
    if hit is not None:
        return hit
    if e is root:
        v = torch.arange(math.prod(root.shape), dtype=torch.int64).view(root.shape)
    elif e.op in _MOVES or e.op == "cat":
        args = []
        for a in e.args:
            t = _index_tensor(a, root, memo)
            if t is None:
                return None
            args.append(t)
        v = apply_op(e.op, e.attrs, args)
    else:
        return None
    memo[e.id] = v
    return v


def movement_of_root(S, c: Expr, root: Expr) -> Expr | None:
    """``view(permute(root, p), c.shape)`` when ``c`` (a movement of ``root``) equals it element
    for element, for some permutation ``p`` (identity first); else None."""
    if c is root:
        return root
    n = math.prod(root.shape)
    if math.prod(c.shape) != n or c.dtype != root.dtype or len(root.shape) > MAX_RANK or n > MAX_NUMEL:
        return None
    try:
        T = _index_tensor(c, root, {})
    except (RuntimeError, ShapeError):  # pragma: no cover - malformed movement
        return None
    if T is None or tuple(T.shape) != tuple(c.shape):
        return None
    flat = T.reshape(-1)
    base = torch.arange(n, dtype=torch.int64).view(root.shape)
    for p in itertools.permutations(range(len(root.shape))):
        want = base.permute(p).reshape(-1)
        if torch.equal(flat, want):
            try:
                return S.view(S.permute(root, p), c.shape)
            except ShapeError:
                return None
    return None


def cat_of_accums(S, pieces: list, dim: int) -> Expr | None:
    """``accum(C_1, .., C_k)`` for ``cat(accum(b_11, .., b_1k), .., accum(b_n1, .., b_nk), dim)`` when
    every column ``j`` (the j-th operand of every piece: the same rank's part, in the same order)
    concatenates to a movement ``C_j`` of one root that uses each of its elements exactly once
    (`movement_of_root`); else None. Element for element the same operands in the same order are
    accumulated, so the identity holds bit for bit. Called by `ExprStore.cat`: rejected on the
    pieces' operators and operand counts before any term is built."""
    first = pieces[0]
    if first.op != "accum":
        return None
    fn, k = first.attrs, len(first.args)
    for p in pieces[1:]:
        if p.op != "accum" or p.attrs != fn or len(p.args) != k:
            return None
    roots = []
    for j in range(k):
        root = _root(first.args[j])
        if root is first.args[j] or any(_root(p.args[j]) is not root for p in pieces[1:]):
            return None
        roots.append(root)
    cols = []
    for j, root in enumerate(roots):
        try:
            joined = S.cat([p.args[j] for p in pieces], dim)
        except ShapeError:
            return None
        moved = movement_of_root(S, joined, root)
        if moved is None:
            return None
        cols.append(moved)
    return S.accum(fn, cols)
