"""Products with one seen as data movement (`relations.movement.unit_product_operand`).

``x * ones`` (the gradient of ``(out * dout).sum()`` is ``ones * dout``) is ``x`` broadcast, for every
value of ``x``, when the product is computed in ``x``'s own real dtype. The movement index treats it
so (its leaves are ``x``'s); anything else with a one in it stays an opaque compute call.

* numerically: torch's ``x * ones`` equals ``x`` broadcast bit for bit on adversarial values (-0.0,
  infinities, NaN, extremes, subnormals) in every accepted dtype, and the rule refuses the dtypes and
  promotions where it would not (complex, a product promoted to another dtype);
* structurally: the operand is returned only for a constant exactly 1 (full / uniform value, under
  movement), never for 2, 1 + eps, a non-uniform tensor or a promoted product;
* in the index: concatenations of ``x_r * ones`` equal concatenations of ``x_r`` (and agree on random
  leaf values), ``x_r * twos`` do not;
* in programs: a row-parallel linear whose output is reduce-scattered along the sequence (its backward
  all-gathers ``ones * dout`` into the weight gradient's mm), in four spellings of the loss, proved;
  a wrong scale refuted (the GPT block's case: tests/test_gpt_sequence_parallel.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import gg_notebook as gg
from gg_notebook.ir.lower import _Full
from gg_notebook.relations.expr import ExprStore, OpSpec, Slot, evaluate
from gg_notebook.relations.ground import _value_node
from gg_notebook.relations.movement import MovementIndex, unit_product_operand

from test_movement import FakeIndex

aten = torch.ops.aten
REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int32, torch.int64,
               torch.uint8, torch.bool)


def _adversarial(dtype, shape, g):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        x = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
        flat = x.view(-1)
        flat[: 2] = torch.tensor([info.min, info.max], dtype=dtype)[: flat.numel()]
        return x
    info = torch.finfo(dtype)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e3).to(dtype)
    special = torch.tensor([-0.0, 0.0, float("inf"), float("-inf"), float("nan"), info.max, info.min, info.tiny,
                            info.tiny / 4], dtype=torch.float64).to(dtype)
    flat = x.view(-1)
    k = min(flat.numel(), special.numel())
    flat[:k] = special[:k]
    return x


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


# ------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", [((7,), (7,)), ((3, 5), (3, 5)), ((5,), (4, 5)), ((4, 1, 6), (2, 4, 3, 6)),
                                    ((), (3, 2))], ids=str)
def test_product_with_ones_is_the_operand_broadcast_bit_for_bit(dtype, shapes):
    g = torch.Generator().manual_seed(hash((str(dtype), shapes)) % 1000)
    xs, out = shapes
    x = _adversarial(dtype, xs, g)
    ones = torch.ones(out, dtype=dtype)
    for y in (x * ones, ones * x, torch.mul(x, torch.ones((), dtype=dtype).expand(out))):
        assert _same_bits(y, x.expand(out))
    if dtype.is_floating_point:  # a 0-dim float64 one promotes only a 0-dim x (the rule asks x's dtype)
        y = x * torch.ones((), dtype=torch.float64)
        assert y.dtype == (torch.float64 if x.dim() == 0 else dtype)
        if y.dtype == dtype:
            assert _same_bits(y, x)


def test_complex_product_with_ones_is_not_the_operand():
    x = torch.tensor([complex(float("inf"), 1.0)])
    assert torch.isnan((x * torch.ones(1, dtype=torch.complex64)).imag).any() or \
        torch.isnan((x * torch.ones(1, dtype=torch.complex64)).real).any()


# ------------------------------------------------------------------------------------------ the rule
def _mul(S, a, b):
    return S.call(OpSpec("ew", "aten.mul.Tensor", aten.mul.Tensor, ((Slot(0), Slot(1)), ())), [a, b])


def _full(S, shape, value, dtype):
    return S.const(OpSpec("const", f"full({value})", _Full.of(shape, value, dtype), ((), ())), shape, dtype)


def _value(S, t):
    return _value_node(S, t)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.int64), ids=str)
def test_rule_accepts_exact_ones_only(dtype):
    S = ExprStore()
    x = S.atom("x", (4, 3), dtype)
    one = _full(S, (4, 3), 1, dtype)
    assert unit_product_operand(_mul(S, x, one)) is x
    assert unit_product_operand(_mul(S, one, x)) is x
    # ones_like(loss).expand(shape): a 0-dim one under an expand
    scalar_one = S.expand(_full(S, (), 1, dtype), (4, 3))
    assert unit_product_operand(_mul(S, scalar_one, x)) is x
    # a uniform value node of ones (a tensor the program built)
    assert unit_product_operand(_mul(S, x, _value(S, torch.ones(4, 3, dtype=dtype)))) is x
    # broadcast: x of shape (3,) times ones (4, 3) is x expanded
    x1 = S.atom("x1", (3,), dtype)
    assert unit_product_operand(_mul(S, x1, one)) is x1
    for other in (_full(S, (4, 3), 2, dtype), _value(S, torch.arange(12).view(4, 3).to(dtype)),
                  _value(S, torch.tensor([[1, 1, 1]] * 3 + [[1, 1, 0]]).to(dtype)), S.atom("y", (4, 3), dtype)):
        assert unit_product_operand(_mul(S, x, other)) is None
    if dtype.is_floating_point:
        near = 1 + torch.finfo(dtype).eps
        assert unit_product_operand(_mul(S, x, _full(S, (4, 3), near, dtype))) is None


def test_rule_refuses_promotion_and_complex():
    S = ExprStore()
    x = S.atom("x", (4, 3), torch.float32)
    # float32 x * float64 ones (not 0-dim): the product is float64, not x
    assert unit_product_operand(_mul(S, x, _full(S, (4, 3), 1, torch.float64))) is None
    xi = S.atom("xi", (4, 3), torch.int64)
    assert unit_product_operand(_mul(S, xi, _full(S, (4, 3), 1, torch.float32))) is None  # int -> float
    xc = S.atom("xc", (4, 3), torch.complex64)
    assert unit_product_operand(_mul(S, xc, _full(S, (4, 3), 1, torch.complex64))) is None


def test_rule_with_the_number_one():
    S = ExprStore()
    x = S.atom("x", (4, 3), torch.float32)
    mul1 = S.call(OpSpec("ew", "aten.mul.Tensor", aten.mul.Tensor, ((Slot(0), 1.0), ())), [x])
    assert unit_product_operand(mul1) is x
    mul2 = S.call(OpSpec("ew", "aten.mul.Tensor", aten.mul.Tensor, ((Slot(0), 2.0), ())), [x])
    assert unit_product_operand(mul2) is None


# ------------------------------------------------------------------------------------------ the index
@pytest.mark.parametrize("seed", range(6))
def test_concatenated_products_with_ones_equal_the_concatenation(seed):
    g = torch.Generator().manual_seed(seed)
    S = ExprStore()
    dtype = (torch.float32, torch.float64)[seed % 2]
    rows = 2 + seed % 3
    a, b = S.atom("a", (rows, 3), dtype), S.atom("b", (rows, 3), dtype)
    m = MovementIndex(FakeIndex(S))
    ones = _full(S, (rows, 3), 1, dtype)
    lhs = S.view(S.cat([_mul(S, a, ones), _mul(S, ones, b)], 0), (2 * rows * 3,))
    rhs = S.view(S.cat([a, b], 0), (2 * rows * 3,))
    assert m.equal(lhs, rhs)
    vals = {"a": _adversarial(dtype, (rows, 3), g), "b": _adversarial(dtype, (rows, 3), g)}
    got = evaluate(lhs, lambda e: vals[e.attrs[0]] if e.op == "atom" else None)
    want = evaluate(rhs, lambda e: vals[e.attrs[0]] if e.op == "atom" else None)
    assert _same_bits(got, want)
    twos = _full(S, (rows, 3), 2, dtype)
    assert not m.equal(S.view(S.cat([_mul(S, a, twos), _mul(S, twos, b)], 0), (2 * rows * 3,)), rhs)
    # the wrong order of blocks is not the concatenation either
    assert not m.equal(S.view(S.cat([_mul(S, b, ones), _mul(S, a, ones)], 0), (2 * rows * 3,)), rhs)


# ------------------------------------------------------------------------------------------ programs
class _ReduceScatterSeq(torch.autograd.Function):
    """megatron-core's reduce-scatter to the sequence-parallel region: the forward sums the ranks'
    partial outputs and keeps this rank's block of the sequence, the backward all-gathers the
    gradient (here ``ones * dout``, the gradient of the rank's loss)."""

    @staticmethod
    def forward(ctx, x):
        out = torch.empty((x.shape[0] // dist.get_world_size(), *x.shape[1:]), dtype=x.dtype)
        dist.reduce_scatter_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, g):
        out = torch.empty((g.shape[0] * dist.get_world_size(), *g.shape[1:]), dtype=g.dtype)
        dist.all_gather_into_tensor(out, g.contiguous())
        return out


_LOSSES = {
    "mul_sum": lambda y, d: (y * d).sum(),
    "dot": lambda y, d: torch.dot(y.reshape(-1), d.reshape(-1)),
    "einsum": lambda y, d: torch.einsum("sh,sh->", y, d),
    "mul_sum_dim": lambda y, d: torch.sum(torch.mul(y, d), dim=(0, 1)),
}


def _w_grad_seq(x, w, dout, loss):
    return torch.autograd.grad(loss(x @ w, dout), [w])[0]


def _w_grad_sp(x, w, dout, loss, scale=1.0):
    # row-parallel linear with sequence parallelism: x split by columns, w by rows, the partial output
    # reduce-scattered along the sequence; dout is this rank's sequence block
    y = _ReduceScatterSeq.apply(x @ w)
    return torch.autograd.grad(loss(y, dout * scale), [w])[0]


def _problem(fn, scale=1.0):
    g = torch.Generator().manual_seed(1)
    x, w, d = (torch.randn(8, 4, dtype=torch.float64, generator=g), torch.randn(4, 3, dtype=torch.float64, generator=g),
               torch.randn(8, 3, dtype=torch.float64, generator=g))
    w.requires_grad_()
    return gg.Problem(lambda x, w, d: _w_grad_seq(x, w, d, fn), lambda x, w, d: _w_grad_sp(x, w, d, fn, scale),
                      [x, w, d], [gg.Shard(1), gg.Shard(0), gg.Shard(0)], 2, expect=[gg.Shard(0)])


@pytest.mark.parametrize("loss", sorted(_LOSSES))
def test_weight_gradient_of_a_reduce_scattered_output(loss):
    r = gg.verify(_problem(_LOSSES[loss]))
    assert r.status is gg.Status.PROVED, str(r)


@pytest.mark.parametrize("loss", ["mul_sum", "einsum"])
def test_weight_gradient_of_a_reduce_scattered_output_bug_refuted(loss):
    assert gg.verify(_problem(_LOSSES[loss], 2.0)).status is gg.Status.REFUTED
