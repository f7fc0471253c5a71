"""Boolean-mask selections reduced at once (capture/masked_select.py): the traced graph has fixed
shapes and computes what the program computes (numeric checks on random masks, including the
all-False mask), and a selection used any other way is refused with a clear message."""

from __future__ import annotations

import inspect

import pytest
import torch

import gg_notebook as gg
from gg_notebook.capture import CaptureError
from gg_notebook.capture.masked_select import has_unbacked
from gg_notebook.capture.tracing import trace_program

R = gg.Replicate()


def trace(fn, *inputs):
    """fn traced as a sequential program (rank=None): the finished fx graph."""
    p = gg.Problem(sequential=fn, distributed=fn, inputs=list(inputs), placements=[R] * len(inputs), world_size=2)
    gm, _ = trace_program(p, None)
    return gm


def ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    rtol = 1e-12 if a.dtype == torch.float64 else 1e-5  # the sums may add in another order
    return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, equal_nan=True, rtol=rtol, atol=0)


# each program reduces a selection at once; the masks: random, all False, all True
def mean_bool_index(x, m):
    return x[m].mean()


def sum_bool_index(x, m):
    return x[m].sum()


def mean_masked_select(x, m):
    return torch.masked_select(x, m).mean()


def sum_masked_select_broadcast(x, keep_row):
    return torch.masked_select(x, keep_row.unsqueeze(-1)).sum()  # mask [B, 1] broadcast over x [B, V]


def mean_nonzero_tuple(x, m):
    return x[m.nonzero(as_tuple=True)].mean()


def sum_over_selected_rows(h, m):
    return h[m].sum(0)  # h [B, S, D], m [B, S]: the rows of the kept tokens, summed


def mean_over_selected_rows_keepdim(h, m):
    return h[m].mean(dim=0, keepdim=True)


def mean_all_of_selected_rows(h, m):
    return h[m].mean()


def sum_over_inner_mask(h, m):
    return h[:, m].sum(dim=(0, 1))  # h [B, S, D], m [S]


def sum_div_numel(x, m):
    kept = x[m]
    return kept.sum() / kept.numel()


def sum_div_size0(x, m):
    kept = x[m]
    return kept.sum() / kept.shape[0]


def rows_div_numel(h, m):
    sel = h[m]
    return sel.sum() / sel.numel()


def sum_dtype(x, m):
    return x[m].sum(dtype=torch.float64)


def count_true(m):
    return m[m].sum()  # a bool selection summed: int64


def labels_not_ignored(logits, labels):
    return logits[labels != -100].sum(dim=0)  # the kept tokens' logits, summed over tokens


CASES = [
    (mean_bool_index, lambda g: [torch.randn(4, 6, generator=g, dtype=torch.float64)], (4, 6)),
    (sum_bool_index, lambda g: [torch.randn(4, 6, generator=g, dtype=torch.float32)], (4, 6)),
    (mean_masked_select, lambda g: [torch.randn(12, generator=g, dtype=torch.float64)], (12,)),
    (sum_masked_select_broadcast, lambda g: [torch.randn(3, 5, generator=g, dtype=torch.float64)], (3,)),
    (mean_nonzero_tuple, lambda g: [torch.randn(4, 6, generator=g, dtype=torch.float64)], (4, 6)),
    (sum_over_selected_rows, lambda g: [torch.randn(2, 4, 3, generator=g, dtype=torch.float64)], (2, 4)),
    (mean_over_selected_rows_keepdim, lambda g: [torch.randn(2, 4, 3, generator=g, dtype=torch.float64)], (2, 4)),
    (mean_all_of_selected_rows, lambda g: [torch.randn(2, 4, 3, generator=g, dtype=torch.float64)], (2, 4)),
    (sum_over_inner_mask, lambda g: [torch.randn(2, 5, 3, generator=g, dtype=torch.float64)], (5,)),
    (sum_div_numel, lambda g: [torch.randn(10, generator=g, dtype=torch.float64)], (10,)),
    (sum_div_size0, lambda g: [torch.randn(10, generator=g, dtype=torch.float64)], (10,)),
    (rows_div_numel, lambda g: [torch.randn(2, 4, 3, generator=g, dtype=torch.float64)], (2, 4)),
    (sum_dtype, lambda g: [torch.randn(8, generator=g, dtype=torch.float32)], (8,)),
]


def _masks(shape, g):
    yield torch.rand(shape, generator=g) > 0.5
    yield torch.zeros(shape, dtype=torch.bool)
    yield torch.ones(shape, dtype=torch.bool)


@pytest.mark.parametrize("fn,make,mshape", CASES, ids=[c[0].__name__ for c in CASES])
def test_selection_reduced_at_once_is_lowered_to_fixed_shapes(fn, make, mshape):
    g = torch.Generator().manual_seed(1)
    xs = make(g)
    gm = trace(fn, *xs, torch.rand(mshape, generator=g) > 0.5)
    assert not has_unbacked(gm)
    assert not ops(gm) & {"aten.nonzero.default", "aten.masked_select.default", "aten.index.Tensor"}, gm.graph
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        xs = make(g)
        for m in _masks(mshape, g):
            want = fn(*xs, m)
            (got,) = gm(*xs, m)
            assert same(got, want), (fn.__name__, m, got, want)


def test_empty_selection_mean_is_nan_and_sum_zero():
    x = torch.randn(6, dtype=torch.float64)
    m = torch.zeros(6, dtype=torch.bool)
    (mean,) = trace(mean_bool_index, x, m)(x, m)
    (total,) = trace(sum_bool_index, x, m)(x, m)
    assert torch.isnan(mean) and total.item() == 0.0 and total.dtype == torch.float64


def test_unselected_inf_is_never_read():
    x = torch.tensor([1.0, float("inf"), 3.0], dtype=torch.float64)
    m = torch.tensor([True, False, True])
    (got,) = trace(mean_bool_index, x, m)(x, m)
    assert got.item() == 2.0


def test_bool_selection_sum_is_int64_count():
    m = torch.tensor([True, False, True, True])
    gm = trace(count_true, m)
    (got,) = gm(m)
    assert got.dtype == torch.int64 and got.item() == 3


def test_hf_style_labels_not_ignored():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    gm = trace(labels_not_ignored, logits, labels)
    (got,) = gm(logits, labels)
    assert same(got, labels_not_ignored(logits, labels))


# ---------------------------------------------------------------------------------------------
# refused: the selection's shape matters


def returned(x, m):
    return x[m]


def matmul_selected(h, m, w):
    return (h[m] @ w).sum()


def elementwise_with_other(x, m, y):
    return (x[m] * y[m]).sum()


def max_of_selection(x, m):
    return x[m].max()


def mean_keeping_selected_dim(h, m):
    return h[m].sum(-1)


def len_of_selection(x, m):
    kept = x[m]
    return kept.sum() / len(kept)  # len() needs a Python int: a data-dependent guard


def test_len_of_selection_is_refused_as_control_flow():
    with pytest.raises(CaptureError) as e:
        trace(len_of_selection, torch.randn(6), torch.rand(6) > 0.5)
    assert "depends on tensor values cannot be traced" in str(e.value)
    assert _line(len_of_selection, "len(kept)") in str(e.value)


def nonzero_used(x, m):
    return x[m].sum() + m.nonzero().sum()


def _line(fn, text):
    lines, start = inspect.getsourcelines(fn)
    k = next(i for i, t in enumerate(lines) if text in t)
    return f"test_masked_select.py:{start + k}"


@pytest.mark.parametrize("fn,inputs,text", [
    (returned, lambda: [torch.randn(6), torch.rand(6) > 0.5], "x[m]"),
    (matmul_selected, lambda: [torch.randn(2, 3, 4), torch.rand(2, 3) > 0.5, torch.randn(4, 2)], "h[m]"),
    (elementwise_with_other, lambda: [torch.randn(6), torch.rand(6) > 0.5, torch.randn(6)], "x[m]"),
    (max_of_selection, lambda: [torch.randn(6), torch.rand(6) > 0.5], "x[m]"),
    (mean_keeping_selected_dim, lambda: [torch.randn(2, 3, 4), torch.rand(2, 3) > 0.5], "h[m]"),
    (nonzero_used, lambda: [torch.randn(6), torch.rand(6) > 0.5], "m.nonzero()"),
], ids=["returned", "matmul", "elementwise-with-other", "max", "keeps-selected-dim", "nonzero-used"])
def test_selection_used_by_shape_is_refused(fn, inputs, text):
    with pytest.raises(CaptureError) as e:
        trace(fn, *inputs())
    msg = str(e.value)
    assert msg.startswith("the sequential program: an operator whose result's shape depends on tensor values")
    assert "(x * mask).sum() / mask.sum()" in msg
    assert _line(fn, text) in msg, msg


def float_then_mean(x, m):
    return x[m].float().mean()  # a cast of the selection: the cast of x, selected


def neg_exp_scaled_sum(x, m):
    return (-x[m]).exp().mul(0.5).sum()


def log_of_selected(x, m):
    return x[m].log().sum()  # log of the unselected negatives is NaN: never read


@pytest.mark.parametrize("fn,dtype", [(float_then_mean, torch.float64), (neg_exp_scaled_sum, torch.float64),
                                      (float_then_mean, torch.bfloat16)])
def test_elementwise_functions_of_a_selection(fn, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64).to(dtype)
    gm = trace(fn, x, torch.rand(3, 4, generator=g) > 0.5)
    assert not has_unbacked(gm)
    for m in _masks((3, 4), g):
        (got,) = gm(x, m)
        assert same(got, fn(x, m))


def test_function_undefined_on_unselected_elements():
    x = torch.tensor([2.0, -1.0, 4.0], dtype=torch.float64)
    m = torch.tensor([True, False, True])
    (got,) = trace(log_of_selected, x, m)(x, m)
    assert torch.isclose(got, torch.tensor(8.0, dtype=torch.float64).log())


def test_bitwise_verification_refuses_the_rewrite():
    p = gg.Problem(sequential=mean_bool_index, distributed=mean_bool_index, inputs=[torch.randn(6), torch.rand(6) > 0.5],
                   placements=[R, R], world_size=2, expect=[R])
    assert gg.verify(p, capture="inprocess").status is gg.Status.PROVED
    with pytest.raises(CaptureError) as e:
        gg.verify(p, exact="bitwise", capture="inprocess")
    assert "not bit for bit" in str(e.value) and _line(mean_bool_index, "x[m].mean()") in str(e.value)


def wrong_mask_shape(x, m):
    return x.unsqueeze(0)[m].mean()  # the mask does not fit the indexed dims: a user error


def mean_of_ints(x, m):
    return x.int()[m].mean()


@pytest.mark.parametrize("fn,error", [(wrong_mask_shape, "IndexError"), (mean_of_ints, "RuntimeError")])
def test_user_errors_in_a_selection_are_reported_as_such(fn, error):
    with pytest.raises(CaptureError) as e:
        trace(fn, torch.randn(6), torch.rand(6) > 0.5)
    msg = str(e.value)
    assert msg.startswith(f"the sequential program raised {error}"), msg
    assert "shape depends on tensor values" not in msg
