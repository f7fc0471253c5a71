"""The scalar normal form on values with many bases (relations/linear.py, `MAX_SPREAD`).

A backward's residual-stream gradient is a sum over layers and ranks: its normal form has dozens of
bases. Such a form is not spread over the operators that read it (one new term per base per
operator made inference quadratic in depth); its factor comes out over one canonical combination
term instead, so scales still cancel. Forms have no per-question budget: the same term gets the same
form whichever questions came first."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from gg_notebook.ir.specs import ew_spec, reduce_spec
from gg_notebook.relations.expr import ExprStore, OpSpec, Slot, evaluate
from gg_notebook.relations.linear import MAX_SPREAD, LinearForms

aten = torch.ops.aten
MM = OpSpec("matmul", "aten.mm.default", aten.mm.default, ((Slot(0), Slot(1)), ()))
TANH_BWD = OpSpec("ew", "aten.tanh_backward.default", aten.tanh_backward.default, ((Slot(0), Slot(1)), ()))
ADD = ew_spec(aten.add.Tensor, 2)
DIV4 = OpSpec("ew", "aten.div.Scalar", aten.div.Scalar, ((Slot(0), 4.0), ()))


def _chain(S, parts, w, y, scale=None):
    """mm(tanh_backward(view(sum(parts) [/ 4]), y), w): linear in the sum at every step."""
    s = parts[0]
    for p in parts[1:]:
        s = S.call(ADD, [s, p])
    if scale is not None:
        s = S.call(scale, [s])
    v = S.view(s, (4, 3))
    return S.call(MM, [S.call(TANH_BWD, [v, y]), w])


@pytest.mark.parametrize("n", [MAX_SPREAD - 1, MAX_SPREAD + 1, 3 * MAX_SPREAD])
def test_a_factor_cancels_through_operators_whatever_the_number_of_bases(n):
    S = ExprStore()
    F = LinearForms(S)
    parts = [S.atom(f"p{i}", (12,), torch.float64) for i in range(n)]
    w = S.atom("w", (3, 5), torch.float64)
    y = S.atom("y", (4, 3), torch.float64)
    whole = _chain(S, parts, w, y)
    quarter = _chain(S, parts, w, y, DIV4)
    assert F.ratio(quarter, whole) == Fraction(1, 4)
    # the parts summed in another grouping: the same form
    regrouped = _chain(S, parts[::-1], w, y)
    assert F.ratio(regrouped, whole) == 1
    # one part missing or counted twice: not a multiple
    missing = _chain(S, parts[1:], w, y)
    twice = _chain(S, parts + parts[:1], w, y)
    assert F.ratio(missing, whole) is None and F.ratio(twice, whole) is None
    # the form is the value: evaluate it on random inputs
    g = torch.Generator().manual_seed(n)
    vals = {p.id: torch.randn(12, generator=g, dtype=torch.float64) for p in parts}
    vals[w.id] = torch.randn(3, 5, generator=g, dtype=torch.float64)
    vals[y.id] = torch.randn(4, 3, generator=g, dtype=torch.float64)
    leaf = lambda e: vals[e.id]  # noqa: E731
    got = sum(float(c) * evaluate(b, leaf) for b, c in F.of(quarter))
    torch.testing.assert_close(got, evaluate(quarter, leaf))
    if n > MAX_SPREAD:  # not spread: one base below the operators
        assert len(F.of(quarter)) == 1


def test_forms_do_not_depend_on_the_order_of_questions():
    """Which terms are multiples of which (and by what factor) is the same whatever the order in
    which their forms were asked for (a budget per question made it depend on what came before)."""
    def ratios(order_seed):
        S = ExprStore()
        parts = [S.atom(f"p{i}", (12,), torch.float64) for i in range(3 * MAX_SPREAD)]
        w = S.atom("w", (3, 5), torch.float64)
        y = S.atom("y", (4, 3), torch.float64)
        terms = [_chain(S, parts[:k], w, y, DIV4 if k % 2 else None) for k in range(2, len(parts) + 1)]
        terms += [_chain(S, parts[k - 1::-1], w, y, DIV4) for k in range(2, len(parts) + 1, 5)]
        terms += [S.call(reduce_spec("sum", (0,), False), [t]) for t in terms]
        F = LinearForms(S)
        order = list(range(len(terms)))
        random.Random(order_seed).shuffle(order)
        for i in order:
            F.key(terms[i])
        return {(i, j): F.ratio(terms[i], terms[j]) for i in range(len(terms)) for j in range(len(terms))}

    first = ratios(0)
    assert sum(r is not None for r in first.values()) > len(first) ** 0.5  # some multiples besides i == j
    assert all(ratios(seed) == first for seed in (1, 2, 3))
