"""`ExprStore.cat` of reductions whose operands re-form whole values (relations/cat_sums.py):
``cat(sum(A[0:1], B[0:1]), sum(A[1:2], B[1:2])) == sum(A, B)``. Randomized: every rewrite is checked
numerically (bit for bit), and the rule must not fire on gaps, overlaps, pieces in the wrong order,
different bases, operands in different orders or mixed reductions (the concatenation is kept)."""

from __future__ import annotations

import math

import pytest
import torch

from gg_notebook.relations.cat_sums import cat_of_accums, movement_of_root
from gg_notebook.relations.expr import ExprStore, evaluate


def _atoms(S, g, k, shape, name="R"):
    vals = {f"{name}{j}": torch.randn(shape, generator=g, dtype=torch.float64) for j in range(k)}
    return vals, [S.atom(n, shape, torch.float64) for n in vals]


def _value(e, vals):
    return evaluate(e, lambda x: vals[x.attrs[0]])


def _cuts(g, size):
    """A random split of ``size`` into at least two contiguous extents: [(a, b), ...]."""
    n = int(torch.randint(2, size + 1, (1,), generator=g))
    inner = sorted(torch.randperm(size - 1, generator=g)[: n - 1].add(1).tolist())
    edges = [0] + inner + [size]
    return list(zip(edges[:-1], edges[1:]))


def _direct(fn, cols):
    """cat(accum_fn(col_0[i], col_1[i], ..)) computed by torch, pieces given per column."""
    out = []
    for i in range(len(cols[0])):
        acc = cols[0][i]
        for c in cols[1:]:
            v = c[i]
            acc = acc + v if fn == "sum" else (torch.maximum(acc, v) if fn == "max" else torch.minimum(acc, v))
        out.append(acc)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_slices_along_the_dim_reform_the_sum(seed):
    g = torch.Generator().manual_seed(seed)
    S = ExprStore()
    nd = int(torch.randint(1, 4, (1,), generator=g))
    shape = tuple(int(s) for s in torch.randint(2, 6, (nd,), generator=g))
    d = int(torch.randint(0, nd, (1,), generator=g))
    k = int(torch.randint(2, 5, (1,), generator=g))
    fn = ("sum", "max", "min")[seed % 3]
    vals, roots = _atoms(S, g, k, shape)
    cuts = _cuts(g, shape[d])
    pieces = [S.accum(fn, [S.slice(R, d, a, b) for R in roots]) for a, b in cuts]
    got = S.cat(pieces, d)
    assert got.op == "accum" and got.attrs == fn and [a.id for a in got.args] == [R.id for R in roots]
    direct = torch.cat(_direct(fn, [[vals[R.attrs[0]].narrow(d, a, b - a) for a, b in cuts] for R in roots]), d)
    assert torch.equal(_value(got, vals), direct)


@pytest.mark.parametrize("seed", range(8))
def test_flattened_slices_gathered_and_viewed_back(seed):
    # Megatron's scatter-gather p2p: each rank's 1/tp slice of the flattened reduction, gathered and
    # viewed back to the activation's shape
    g = torch.Generator().manual_seed(100 + seed)
    S = ExprStore()
    rows, cols, tp = 2 * int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g)), 2
    vals, roots = _atoms(S, g, tp, (rows, cols))
    total = S.accum("sum", roots)
    flat = S.view(total, (rows * cols,))
    n = rows * cols // tp
    gathered = S.cat([S.slice(flat, 0, r * n, (r + 1) * n) for r in range(tp)], 0)
    got = S.view(gathered, (rows, cols))
    assert got.id == total.id
    assert torch.equal(_value(got, vals), vals["R0"] + vals["R1"])


@pytest.mark.parametrize("seed", range(8))
def test_transposed_rows_reform_the_transposed_sum(seed):
    # rows of the reduction, each viewed as a column, concatenated along dim 1: the sum's transpose
    g = torch.Generator().manual_seed(200 + seed)
    S = ExprStore()
    m, n, k = (int(s) for s in torch.randint(2, 5, (3,), generator=g))
    vals, roots = _atoms(S, g, k, (m, n))
    pieces = [S.accum("sum", [S.view(S.slice(R, 0, i, i + 1), (n, 1)) for R in roots]) for i in range(m)]
    got = S.cat(pieces, 1)
    assert got.op == "accum" and all(a.op == "permute" for a in got.args)
    assert torch.equal(_value(got, vals), sum(vals[R.attrs[0]] for R in roots).T.contiguous())


def _kept(S, pieces, dim, vals, direct):
    got = S.cat(pieces, dim)
    assert got.op == "cat", got
    assert torch.equal(_value(got, vals), direct)
    return got


@pytest.mark.parametrize("seed", range(6))
def test_declines_gaps_overlaps_order_and_bases(seed):
    g = torch.Generator().manual_seed(300 + seed)
    S = ExprStore()
    m, n = 3 + int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
    vals, (A, B) = _atoms(S, g, 2, (m, n))
    vals2, (C,) = _atoms(S, g, 1, (m, n), name="C")
    vals.update(vals2)
    a, b, c = vals["R0"], vals["R1"], vals["C0"]

    def sl(R, i, j):
        return S.slice(R, 0, i, j)

    # a gap: rows [0, 1) and [2, m) (row 1 missing)
    _kept(S, [S.accum("sum", [sl(A, 0, 1), sl(B, 0, 1)]), S.accum("sum", [sl(A, 2, m), sl(B, 2, m)])], 0, vals,
          torch.cat([a[0:1] + b[0:1], a[2:m] + b[2:m]]))
    # an overlap: rows [0, 2) and [1, m) (m + 1 rows of an m-row tensor, row 1 twice)
    _kept(S, [S.accum("sum", [sl(A, 0, 2), sl(B, 0, 2)]), S.accum("sum", [sl(A, 1, m), sl(B, 1, m)])], 0, vals,
          torch.cat([a[0:2] + b[0:2], a[1:m] + b[1:m]]))
    # an overlap with the right element count: rows [0, 2), [1, 2), [3, m) ... use [0, 2) and [1, m-1)
    _kept(S, [S.accum("sum", [sl(A, 0, 2), sl(B, 0, 2)]), S.accum("sum", [sl(A, 1, m - 1), sl(B, 1, m - 1)])], 0,
          vals, torch.cat([a[0:2] + b[0:2], a[1:m - 1] + b[1:m - 1]]))
    # the wrong order: rows [1, m) then [0, 1)
    _kept(S, [S.accum("sum", [sl(A, 1, m), sl(B, 1, m)]), S.accum("sum", [sl(A, 0, 1), sl(B, 0, 1)])], 0, vals,
          torch.cat([a[1:m] + b[1:m], a[0:1] + b[0:1]]))
    # different bases in one column: A's first rows with C's last ones
    _kept(S, [S.accum("sum", [sl(A, 0, 1), sl(B, 0, 1)]), S.accum("sum", [sl(C, 1, m), sl(B, 1, m)])], 0, vals,
          torch.cat([a[0:1] + b[0:1], c[1:m] + b[1:m]]))
    # the operands in another order in the second piece (columns pair A with B)
    _kept(S, [S.accum("sum", [sl(A, 0, 1), sl(B, 0, 1)]), S.accum("sum", [sl(B, 1, m), sl(A, 1, m)])], 0, vals,
          torch.cat([a[0:1] + b[0:1], b[1:m] + a[1:m]]))
    # different reductions
    _kept(S, [S.accum("sum", [sl(A, 0, 1), sl(B, 0, 1)]), S.accum("max", [sl(A, 1, m), sl(B, 1, m)])], 0, vals,
          torch.cat([a[0:1] + b[0:1], torch.maximum(a[1:m], b[1:m])]))
    # a piece that is not a reduction
    _kept(S, [S.accum("sum", [sl(A, 0, 1), sl(B, 0, 1)]), sl(C, 1, m)], 0, vals, torch.cat([a[0:1] + b[0:1], c[1:m]]))
    # transposed rows in the wrong order (a row permutation is no view/permute of the base)
    pieces = [S.accum("sum", [S.view(sl(R, i, i + 1), (n, 1)) for R in (A, B)]) for i in reversed(range(m))]
    _kept(S, pieces, 1, vals, (a + b).flip(0).T.contiguous())


def test_movement_of_root_needs_every_element_once():
    S = ExprStore()
    R = S.atom("R", (4, 3), torch.float64)
    assert movement_of_root(S, S.cat([S.slice(R, 0, 0, 2), S.slice(R, 0, 2, 4)], 0), R) is R
    half = S.cat([S.slice(R, 0, 0, 2), S.slice(R, 0, 0, 2)], 0)  # right element count, rows twice
    assert movement_of_root(S, half, R) is None
    cols = S.cat([S.view(S.slice(R, 0, i, i + 1), (3, 1)) for i in range(4)], 1)
    moved = movement_of_root(S, cols, R)
    assert moved is not None and moved.op == "permute" and moved.attrs == (1, 0)
    assert cat_of_accums(S, [S.slice(R, 0, 0, 2), S.slice(R, 0, 2, 4)], 0) is None  # not reductions
    # reading another node: declined
    Q = S.atom("Q", (4, 3), torch.float64)
    assert movement_of_root(S, S.cat([S.slice(R, 0, 0, 2), S.slice(Q, 0, 2, 4)], 0), R) is None
    assert math.prod(R.shape) == 12
