"""`lemmas.ce_grad._uniform`: the fill of a uniform constant read from its term (no logits-sized tensor
built) must be exactly what evaluating the constant gives, in its dtype; anything else declines."""

from __future__ import annotations

import pytest
import torch

from gg_notebook.ir.lower import _Full
from gg_notebook.lemmas.ce_grad import _uniform, _uniform_fill
from gg_notebook.relations.expr import ExprStore, OpSpec, evaluate


def _full(S, shape, value, dtype):
    return S.const(OpSpec("const", f"full({value})", _Full.of(tuple(shape), value, dtype), ((), ())), tuple(shape), dtype)


def _leaf(_e):
    raise AssertionError("ground")


VALUES = [0.0, -0.0, 1.0, -2.5, 1e-30, float("inf"), float("-inf"), float("nan"), 3, -7]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fill_read_from_the_term_equals_the_evaluated_fill(dtype):
    g = torch.Generator().manual_seed(0)
    S = ExprStore()
    for value in VALUES:
        if not dtype.is_floating_point and isinstance(value, float) and (value != value or abs(value) == float("inf")
                                                                          or value != int(value)):
            continue
        for big in (False, False, True):
            shape = tuple(int(s) for s in torch.randint(1, 5, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g))
            if big:  # logits-like: the fill is read from the term either way
                shape = (1 << 8,) + shape + (1 << 6,)
            base = _full(S, shape, value, dtype)
            terms = [base, S.view(base, (int(torch.tensor(shape).prod()),)),
                     S.expand(S.view(base, (1,) + shape), (3,) + shape), S.slice(base, 0, 0, shape[0])]
            if len(shape) > 1:
                terms.append(S.permute(base, tuple(reversed(range(len(shape))))))
            for t in terms:
                want = evaluate(t, _leaf).reshape(-1)
                fast = _uniform_fill(t)
                if value != value:  # NaN: never uniform (NaN != NaN), as the evaluated check says
                    assert fast is None and _uniform(t) is None
                    continue
                assert fast is not None and fast.dtype == want.dtype
                assert torch.equal(fast, want[0]) and bool(torch.signbit(fast.float()) == torch.signbit(want[0].float()))
                assert torch.equal(_uniform(t), want[0])


def test_declines_on_anything_else():
    S = ExprStore()
    a = S.atom("a", (2, 3), torch.float64)
    assert _uniform_fill(a) is None and _uniform(a) is None
    empty = _full(S, (0, 3), 1.0, torch.float64)
    assert _uniform_fill(empty) is None and _uniform(empty) is None
