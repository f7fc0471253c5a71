"""Exact radical constants (gg_notebook/relations/exact.py) and their use in the scalar normal form."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from gg_notebook.relations.exact import Inexpressible, Radical, read_float, root
from gg_notebook.relations.linear import coefficient


@pytest.mark.parametrize("d", [2, 3, 5, 6, 8, 12, 64, 96, 128])
def test_spellings_of_one_over_sqrt_d_agree(d):
    forms = {coefficient(1 / math.sqrt(d)), coefficient(d ** -0.5), coefficient(math.sqrt(d) ** -1),
             coefficient(1.0 / math.sqrt(float(d))), 1 / coefficient(math.sqrt(d))}
    assert len(forms) == 1, forms
    (c,) = forms
    # SDPA's math form scales q and k by sqrt(scale) each: the product is the scale, exactly
    q = coefficient(math.sqrt(1 / math.sqrt(d)))
    assert q * q == c
    assert abs(float(c) - d ** -0.5) < 1e-15


def test_different_reals_stay_different():
    assert coefficient(1 / math.sqrt(8)) != coefficient(1 / math.sqrt(8.000001))
    assert coefficient(math.sqrt(2)) != coefficient(math.sqrt(3))
    assert coefficient(0.5) != coefficient(math.sqrt(0.5))
    # a float a few ulps away from sqrt(2) still reads as sqrt(2); one far away does not
    assert coefficient(math.sqrt(2) * (1 + 2 ** -52)) == coefficient(math.sqrt(2))
    assert coefficient(math.sqrt(2) * (1 + 2 ** -40)) != coefficient(math.sqrt(2))
    assert read_float(0.1) is None and read_float(math.pi) is None and read_float(math.sqrt(2 / math.pi)) is None


def test_radical_arithmetic():
    s2 = root(Fraction(2), 2)
    assert isinstance(s2, Radical)
    assert s2 * s2 == 2 and isinstance(s2 * s2, Fraction)
    assert root(Fraction(8), 4) ** 4 == 8
    assert 1 / s2 == s2 / 2
    assert s2 + s2 == 2 * s2
    assert -s2 + s2 == 0
    with pytest.raises(Inexpressible):
        _ = s2 + root(Fraction(3), 2)
    with pytest.raises(Inexpressible):
        _ = s2 + 1
    assert hash(root(Fraction(1, 2), 2)) == hash(s2 / 2)


def test_normal_form_cancels_sqrt_scales():
    """(q * c) @ (k * c).T / (c * c) and q @ k.T have one normal form; with a different constant, not."""
    from gg_notebook.relations.expr import ExprStore
    from gg_notebook.relations.linear import LinearForms

    d = 8
    q, k = torch.randn(3, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64)
    c = math.sqrt(1 / math.sqrt(d))
    S = ExprStore()
    a = S.atom("q", q.shape, q.dtype)
    b = S.atom("k", k.shape, k.dtype)

    from torch.fx.experimental.proxy_tensor import make_fx

    def build(fn):
        from gg_notebook.ir.lower import lower
        from gg_notebook.engine.infer import rebuild

        g = lower(make_fx(fn)(q, k))
        env = {g.inputs[0].name: a, g.inputs[1].name: b}
        for n in g.nodes:
            if n.op == "input":
                continue
            ins = [env[i.name] for i in n.inputs]
            if n.op == "call":
                env[n.name] = S.call(n.attrs, ins)
            else:
                from gg_notebook.engine.infer import _Proto

                env[n.name] = rebuild(S, _Proto(n.op, n.attrs), ins)
        return env[g.outputs[0].name]

    F = LinearForms(S)
    spec = build(lambda x, y: x @ y.t() / math.sqrt(d))
    rank = build(lambda x, y: (x * c) @ (y * c).t())
    other = build(lambda x, y: (x * c) @ y.t())
    assert F.ratio(spec, rank) == 1
    assert F.ratio(spec, other) != 1
