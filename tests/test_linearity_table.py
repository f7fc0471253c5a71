"""The linearity table (gg_notebook.ops.linearity), checked row by row against real operators.

For every row: a sample call, traced and lowered like user code; whenever the table says the call is
linear in an argument, splitting that argument into random partials (uneven magnitudes, zeros,
negatives) and summing the per-partial results must give the operator's result. Calls that must
never count as linear (rounding, narrowing casts, scalar operands of add/sub, attribute variants)
must get no answer. A row without a sample fails the suite.
"""

from __future__ import annotations

import pytest
import torch

from gg_notebook.ir.lower import SCALAR_OVERLOAD_TWIN
import torch.nn.functional as F

from gg_notebook.lemmas import _cases as C
from gg_notebook.ops.linearity import linear_args, registered

aten = torch.ops.aten


def r(*shape, dtype=torch.float64, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _ln_bwd(o):
    def f(g, x, mean, rstd, w, b):
        return aten.native_layer_norm_backward(g, x, (5,), mean, rstd, w, b, [True, True, True])[o]
    return f


def _ln_inputs():
    x, w, b = r(3, 5), r(5), r(5)
    _, mean, rstd = aten.native_layer_norm(x, (5,), w, b, 1e-5)
    return (r(3, 5), x, mean, rstd, w, b)


def _nll_bwd_inputs():
    lsm = torch.log_softmax(r(4, 6), -1)
    t = torch.tensor([0, 5, 2, 3])
    tw = aten.nll_loss_forward(lsm, t, None, 1, -100)[1]
    return (r(()), lsm, t, tw)


SAMPLES = {
    aten.add.Tensor: [(lambda x, y: x + y, lambda: (r(3, 4), r(3, 4)))],
    aten.sub.Tensor: [(lambda x, y: x - y, lambda: (r(3, 4), r(4)))],
    aten.mul.Tensor: [(lambda x, y: x * y, lambda: (r(3, 4), r(3, 4))), (lambda x: x * 0.5, lambda: (r(3, 4),))],
    aten.mul.Scalar: [(lambda x: aten.mul.Scalar(x, 3), lambda: (r(3, 4),))],
    aten.neg.default: [(lambda x: -x, lambda: (r(3, 4),))],
    aten.div.Tensor: [(lambda x, y: x / y, lambda: (r(3, 4), r(3, 4).abs() + 1)), (lambda x: x / 3, lambda: (r(3, 4),))],
    aten.div.Scalar: [(lambda x: aten.div.Scalar(x, 4.0), lambda: (r(3, 4),))],
    aten._to_copy.default: [(lambda x: x.double(), lambda: (r(3, 4, dtype=torch.float32),)),
                            (lambda x: x.float(), lambda: (r(3, 4, dtype=torch.bfloat16),))],
    aten.threshold_backward.default: [(lambda g, x: aten.threshold_backward(g, x, 0.0), lambda: (r(3, 4), r(3, 4)))],
    aten.gelu_backward.default: [(lambda g, x: aten.gelu_backward(g, x, approximate="tanh"), lambda: (r(3, 4), r(3, 4)))],
    aten.silu_backward.default: [(lambda g, x: aten.silu_backward(g, x), lambda: (r(3, 4), r(3, 4)))],
    aten.tanh_backward.default: [(lambda g, y: aten.tanh_backward(g, y), lambda: (r(3, 4), r(3, 4).tanh()))],
    aten.sigmoid_backward.default: [(lambda g, y: aten.sigmoid_backward(g, y), lambda: (r(3, 4), r(3, 4).sigmoid()))],
    aten.masked_fill.Scalar: [(lambda x, m: x.masked_fill(m, 0.0), lambda: (r(3, 4), r(3, 4) > 0))],
    aten.mm.default: [(lambda a, b: a @ b, lambda: (r(3, 5), r(5, 2)))],
    aten.bmm.default: [(torch.bmm, lambda: (r(2, 3, 5), r(2, 5, 2)))],
    aten.sum.dim_IntList: [(lambda x: x.sum(-1), lambda: (r(3, 4),)),
                           (lambda x: x.sum(0, dtype=torch.float64), lambda: (r(3, 4, dtype=torch.float32),)),
                           (lambda x: x.sum(), lambda: (r(3, 4),))],
    aten.mean.dim: [(lambda x: x.mean(1, keepdim=True), lambda: (r(3, 4),)), (lambda x: x.mean(), lambda: (r(3, 4),))],
    aten._softmax_backward_data.default: [
        (lambda g, y: aten._softmax_backward_data(g, y, -1, torch.float64), lambda: (r(3, 4), torch.softmax(r(3, 4), -1)))],
    aten._log_softmax_backward_data.default: [
        (lambda g, y: aten._log_softmax_backward_data(g, y, -1, torch.float64),
         lambda: (r(3, 4), torch.log_softmax(r(3, 4), -1)))],
    aten.native_layer_norm_backward.default: [(_ln_bwd(o), _ln_inputs) for o in range(3)],
    aten.embedding.default: [(lambda w, i: F.embedding(i, w, padding_idx=1), lambda: (r(6, 3), torch.tensor([[0, 1, 5]])))],
    aten.embedding_dense_backward.default: [
        (lambda g, i: aten.embedding_dense_backward(g, i, 6, 2, True), lambda: (r(1, 4, 3), torch.tensor([[0, 2, 2, 5]])))],
    aten.nll_loss_backward.default: [
        (lambda g, l, t, tw: aten.nll_loss_backward(g, l, t, None, 1, -100, tw), _nll_bwd_inputs)],
    aten.slice_backward.default: [(lambda g: aten.slice_backward(g, [7, 4], 0, 2, 5, 1), lambda: (r(3, 4),)),
                                  (lambda g: aten.slice_backward(g, [3, 9], 1, 1, 9, 2), lambda: (r(3, 4),))],
    aten.select_backward.default: [(lambda g: aten.select_backward(g, [3, 2, 4], 1, -1), lambda: (r(3, 4),))],
}

NEVER_LINEAR = {
    "div floor": (lambda x: torch.div(x, 3, rounding_mode="floor"), lambda: (r(3, 4),)),
    "div trunc tensor": (lambda x, y: torch.div(x, y, rounding_mode="trunc"), lambda: (r(3, 4), r(3, 4).abs() + 1)),
    "round": (torch.round, lambda: (r(3, 4),)),
    "floor": (torch.floor, lambda: (r(3, 4),)),
    "to bfloat16": (lambda x: x.to(torch.bfloat16), lambda: (r(3, 4, dtype=torch.float32),)),
    "to int32": (lambda x: x.to(torch.int32), lambda: (r(3, 4),)),
    "to half": (lambda x: x.half(), lambda: (r(3, 4),)),
    "add scalar": (lambda x: x + 1.0, lambda: (r(3, 4),)),
    "add int scalar": (lambda x: x + 1, lambda: (r(3, 4),)),
    "sub scalar": (lambda x: x - 2.0, lambda: (r(3, 4),)),
    "rsub": (lambda x: 1.0 - x, lambda: (r(3, 4),)),
    "masked_fill one": (lambda x, m: x.masked_fill(m, 1.0), lambda: (r(3, 4), r(3, 4) > 0)),
    "sum to int": (lambda x: x.sum(0, dtype=torch.int64), lambda: (r(3, 4) * 10,)),
    "softmax backward narrowing": (lambda g, y: aten._softmax_backward_data(g, y, -1, torch.bfloat16),
                                   lambda: (r(3, 4, dtype=torch.float32), torch.softmax(r(3, 4, dtype=torch.float32), -1))),
    "exp": (torch.exp, lambda: (r(3, 4),)),
    "relu": (torch.relu, lambda: (r(3, 4),)),
    "where": (lambda c, x, y: torch.where(c, x, y), lambda: (r(3, 4) > 0, r(3, 4), r(3, 4))),
}


def _parts(t: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` partials of ``t``: wildly different magnitudes, exact zeros, negatives."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * 10 ** k for k in range(n - 1)]
    if parts:
        parts[0] = torch.where(torch.rand(t.shape, generator=g) < 0.3, torch.zeros_like(parts[0]), parts[0])
    parts.append(t - sum(parts) if parts else t)
    return parts


def test_every_row_has_a_sample():
    missing = [str(op) for op in registered() if op not in SAMPLES]
    assert not missing, f"linearity rows without a sample call in this test: {missing}"


@pytest.mark.parametrize("op", sorted(SAMPLES, key=str), ids=str)
def test_row_is_numerically_linear(op):
    for fn, make in SAMPLES[op]:
        tensors = make()
        spec, order = C.spec_of(fn, *tensors)
        # a .Scalar overload is lowered to its .Tensor twin (ir.lower.SCALAR_OVERLOAD_TWIN): same values
        assert spec.target in (op, SCALAR_OVERLOAD_TWIN.get(op)), f"sample for {op} lowered to {spec.target}"
        slot_tensors = [tensors[o] for o in order]
        lin = linear_args(spec, [t.dtype for t in slot_tensors])
        assert lin is not None, f"{op}: the table gives no answer for its own sample"
        mode, slots = lin
        groups = [slots] if mode == "jointly" else [(s,) for s in slots]
        ref = spec.call(slot_tensors)
        for group in groups:
            for n in (2, 3):
                split = {s: _parts(slot_tensors[s], n, seed=17 * n + s) for s in group}
                total = None
                for k in range(n):
                    args = [split[s][k] if s in split else t for s, t in enumerate(slot_tensors)]
                    v = spec.call(args)
                    total = v if total is None else total + v
                tol = 1e-6 if ref.dtype == torch.float64 else 1e-3
                scale = max(1.0, float(ref.abs().max()))
                assert torch.allclose(total.double(), ref.double(), atol=tol * scale * 10 ** n, rtol=tol), \
                    f"{op} is not linear in slots {group} with {n} partials"


@pytest.mark.parametrize("name", sorted(NEVER_LINEAR))
def test_no_linearity_for_rounding_casts_scalars_and_nonlinear_ops(name):
    fn, make = NEVER_LINEAR[name]
    tensors = make()
    spec, order = C.spec_of(fn, *tensors)
    dtypes = [tensors[o].dtype for o in order]
    lin = linear_args(spec, dtypes)
    assert lin is None, f"{name}: {spec.name} counted as {lin}"
