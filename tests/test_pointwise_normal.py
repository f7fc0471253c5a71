"""The pointwise normal form (gg_notebook/ir/pointwise_normal.py).

Every rule: randomized numeric agreement between the spelling as written (run eagerly) and the
graph after `normalize` (several shapes; float64, float32 and where meaningful bfloat16; zeros,
large magnitudes, negatives), a check that the rule fired (and what it produced), and decline
cases where the rewrite would be wrong (another exponent, another constant, another operand, the
unbiased variance, a read statistic, a low-precision layer norm). Plus: commutative operands in the
term store, and that exact="bitwise" never normalizes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import gg_notebook as gg
from gg_notebook.ir.pointwise_normal import GELU_BETA, commuted_args, normalize
from gg_notebook.relations.expr import ExprStore, OpSpec, Slot

aten = torch.ops.aten

SHAPES = [(7,), (2, 3, 8), (4, 1, 6)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-6), torch.bfloat16: (3e-2, 3e-2)}


def _trace(fn, *xs):
    return make_fx(torch.func.functionalize(fn), tracing_mode="fake")(*xs)


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _inputs(shape, dtype, kind, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "large":
        x = x * 1e4
    elif kind == "negative":
        x = -x.abs() - 0.5
    elif kind == "mixed":
        x = x * torch.where(torch.rand(shape, generator=g) < 0.3, 1e3, 1.0)
        x.view(-1)[0] = 0.0
    if positive:
        x = x.abs() + 0.1
    return x.to(dtype)


def _agree(got, want, dtype):
    rtol, atol = _TOL[dtype]
    got, want = got.double(), want.double()
    assert torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True), \
        f"max error {(got - want).abs().nan_to_num(float('inf')).max().item():.3g}"


def _check_rule(fn, rule, produced, *, positive=(), dtypes=DTYPES, kinds=("randn", "zeros", "large", "negative", "mixed"),
                shapes=SHAPES, n_inputs=1, ref=None):
    """``fn`` traced and normalized: ``rule`` fired, ``produced`` (an OpOverload) is in the graph,
    and the normalized graph computes what ``fn`` (or ``ref``) computes eagerly."""
    ref = ref or fn
    for shape in shapes:
        for dtype in dtypes:
            for seed, kind in enumerate(kinds):
                xs = [_inputs(shape, dtype, kind, 10 * seed + i, positive=i in positive) for i in range(n_inputs)]
                gm = _trace(fn, *xs)
                normalize(gm)
                gm.recompile()
                assert gm.meta.get("gg_normalized", {}).get(rule, 0) >= 1, (rule, gm.meta.get("gg_normalized"), gm.graph)
                if produced is not None:
                    assert produced in _targets(gm), gm.graph
                got, want = gm(*xs), ref(*xs)
                got = got[0] if isinstance(got, (tuple, list)) and not isinstance(want, (tuple, list)) else got
                if isinstance(want, (tuple, list)):
                    for g_, w_ in zip(got, want):
                        _agree(g_, w_, dtype)
                else:
                    _agree(got, want, dtype)


def _declines(fn, *xs, rules=None) -> None:
    gm = _trace(fn, *xs)
    before = [str(t) for t in _targets(gm)]
    normalize(gm)
    done = gm.meta.get("gg_normalized", {})
    if rules is None:
        assert not done, (done, gm.graph)
        assert [str(t) for t in _targets(gm)] == before
    else:
        assert not any(done.get(r) for r in rules), (done, gm.graph)


# ------------------------------------------------------------------------------ rules, numerically
def test_pow3_is_chained_mul():
    _check_rule(lambda x: torch.pow(x, 3), "pow3-as-mul", aten.mul.Tensor)
    _check_rule(lambda x: x ** 3.0, "pow3-as-mul", aten.mul.Tensor)


def test_pow_half_and_minus_half():
    _check_rule(lambda v: v ** 0.5, "pow-half-as-sqrt", aten.sqrt.default, positive=(0,))
    _check_rule(lambda v: torch.pow(v, -0.5), "pow-minus-half-as-rsqrt", aten.rsqrt.default, positive=(0,))


def test_div_sqrt_is_mul_rsqrt():
    _check_rule(lambda x, v: x / torch.sqrt(v), "div-sqrt-as-mul-rsqrt", aten.rsqrt.default, n_inputs=2,
                positive=(1,), ref=lambda x, v: x * torch.rsqrt(v))
    _check_rule(lambda x, v: x / torch.sqrt(v), "div-sqrt-as-mul-rsqrt", aten.rsqrt.default, n_inputs=2,
                positive=(1,))
    # broadcast denominator, as in a norm: [.., 1] statistics
    _check_rule(lambda x, v: x / (v.sum(-1, keepdim=True) + 1e-6).sqrt(), "div-sqrt-as-mul-rsqrt", aten.rsqrt.default,
                n_inputs=2, positive=(1,), shapes=[(3, 5), (2, 3, 8)])


def test_reciprocal_sqrt_is_rsqrt():
    _check_rule(lambda v: 1.0 / torch.sqrt(v), "reciprocal-sqrt-as-rsqrt", aten.rsqrt.default, positive=(0,))
    _check_rule(lambda v: torch.sqrt(v).reciprocal(), "reciprocal-sqrt-as-rsqrt", aten.rsqrt.default, positive=(0,))


def test_written_sigmoid():
    _check_rule(lambda x: 1 / (1 + torch.exp(-x)), "written-sigmoid", aten.sigmoid.default, ref=torch.sigmoid)
    _check_rule(lambda x: torch.reciprocal(torch.exp(-x) + 1.0), "written-sigmoid", aten.sigmoid.default)


@pytest.mark.parametrize("spelling", [
    lambda x: x * torch.sigmoid(x),
    lambda x: torch.sigmoid(x) * x,
    lambda x: x / (1.0 + torch.exp(-x)),
    lambda x: x / (torch.exp(-x) + 1),
    lambda x: x * (1 / (1 + torch.exp(-x))),
], ids=["x*sigmoid", "sigmoid*x", "x/(1+exp(-x))", "x/(exp(-x)+1)", "x*(1/(1+exp(-x)))"])
def test_written_silu(spelling):
    _check_rule(spelling, "written-silu", aten.silu.default)
    _check_rule(spelling, "written-silu", aten.silu.default, ref=F.silu, dtypes=[torch.float64])


@pytest.mark.parametrize("spelling", [
    lambda u, g: u * torch.sigmoid(g) * g,
    lambda u, g: g * u * torch.sigmoid(g),
    lambda u, g: (g / (1 + torch.exp(-g))) * u,
], ids=["u*sigmoid(g)*g", "g*u*sigmoid(g)", "silu-div*u"])
def test_written_silu_times_one_factor(spelling):
    _check_rule(spelling, "written-silu", aten.silu.default, n_inputs=2, ref=lambda u, g: u * F.silu(g),
                dtypes=[torch.float64, torch.float32])


def _gelu_a(h):
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3))))


def _gelu_b(h):
    return h * 0.5 * (1 + torch.tanh((2 / math.pi) ** 0.5 * (h + 0.044715 * h * h * h)))


def _gelu_c(h):
    return 0.5 * (h * (1 + torch.tanh(0.7978845608028654 * (0.044715 * h ** 3 + h))))


def _gelu_d(h):
    return h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))) / 2


@pytest.mark.parametrize("spelling", [_gelu_a, _gelu_b, _gelu_c, _gelu_d], ids=["0.5*h*(..)", "h*0.5*(..)*h*h*h",
                                                                              "0.5*(h*(..))", "h*(..)/2"])
def test_written_gelu_tanh(spelling):
    _check_rule(spelling, "written-gelu-tanh", aten.gelu.default)
    _check_rule(spelling, "written-gelu-tanh", aten.gelu.default, ref=lambda h: F.gelu(h, approximate="tanh"),
                dtypes=[torch.float64, torch.float32], kinds=("randn", "zeros", "negative", "mixed"))
    gm = _trace(spelling, torch.randn(3, 4, dtype=torch.float64))
    normalize(gm)
    (g,) = [n for n in gm.graph.nodes if n.target is aten.gelu.default]
    assert g.kwargs == {"approximate": "tanh"}


def test_gelu_constant_is_pytorchs():
    assert float(GELU_BETA) == math.sqrt(2 / math.pi) == (2 / math.pi) ** 0.5


def test_addcmul():
    _check_rule(lambda b, t1, t2: torch.addcmul(b, t1, t2), "addcmul-as-add-mul", aten.add.Tensor, n_inputs=3)
    _check_rule(lambda b, t1, t2: torch.addcmul(b, t1, t2, value=-0.25), "addcmul-as-add-mul", aten.add.Tensor,
                n_inputs=3)


@pytest.mark.parametrize("keepdim", [True, False])
@pytest.mark.parametrize("dim", [-1, 0, (0, -1), None])
def test_biased_var_mean(dim, keepdim):
    shapes = [(3, 5), (2, 3, 8)]
    dts = [torch.float64, torch.float32]
    if dim is None:
        fn = lambda x: torch.var_mean(x, correction=0, keepdim=keepdim)  # noqa: E731
    else:
        fn = lambda x: torch.var_mean(x, dim, correction=0, keepdim=keepdim)  # noqa: E731
    _check_rule(fn, "biased-var_mean-written", aten.mean.dim, shapes=shapes, dtypes=dts)
    if dim is not None:
        _check_rule(lambda x: x.var(dim, keepdim=keepdim, unbiased=False), "biased-var-written", aten.mean.dim,
                    shapes=shapes, dtypes=dts)
        _check_rule(lambda x: torch.var(x, dim, correction=0, keepdim=keepdim), "biased-var-written", aten.mean.dim,
                    shapes=shapes, dtypes=dts)


@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
def test_layer_norm_written(affine):
    for shape, k in (((2, 3, 8), 1), ((4, 6), 1), ((2, 3, 4), 2)):
        norm = shape[len(shape) - k:]

        def fn(x, w, b):
            return F.layer_norm(x, norm, w if "w" in affine else None, b if "b" in affine else None, 1e-5)

        for dtype in (torch.float64, torch.float32):
            for seed, kind in enumerate(("randn", "zeros", "large", "negative", "mixed")):
                x = _inputs(shape, dtype, kind, seed)
                w, b = _inputs(norm, dtype, "randn", 100 + seed), _inputs(norm, dtype, "randn", 200 + seed)
                gm = _trace(fn, x, w, b)
                normalize(gm)
                gm.recompile()
                assert gm.meta["gg_normalized"].get("layer_norm-written") == 1
                assert aten.native_layer_norm.default not in _targets(gm)
                assert aten.rsqrt.default in _targets(gm)
                got, want = gm(x, w, b), fn(x, w, b)
                got = got[0] if isinstance(got, (tuple, list)) else got
                rtol, atol = (1e-9, 1e-9) if dtype == torch.float64 else (1e-4, 1e-4)
                if kind == "large":
                    rtol, atol = (1e-7, 1e-7) if dtype == torch.float64 else (1e-3, 1e-3)
                assert torch.allclose(got, want, rtol=rtol, atol=atol), (shape, dtype, kind)


# ------------------------------------------------------------------------------ declines
def test_declines_other_exponents():
    x = torch.randn(3, 4, dtype=torch.float64)
    _declines(lambda x: torch.pow(x, 2.5), x)
    _declines(lambda x: torch.pow(x, 4), x)
    _declines(lambda x: torch.pow(x, -1.5), x)
    _declines(lambda x: torch.pow(x.to(torch.int64), 3), x)  # integer tensors stay as written
    # pow(x, 3) is not x * x: the rewrite is a product of three
    gm = _trace(lambda x: torch.pow(x, 3), x)
    normalize(gm)
    muls = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    assert len(muls) == 2


def test_declines_div_not_by_sqrt():
    x, v = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 0.1
    _declines(lambda x, v: x / (torch.sqrt(v) + 1e-6), x, v)  # eps outside the root
    _declines(lambda x, v: x / torch.exp(v), x, v)
    _declines(lambda x, v: torch.div(x, torch.sqrt(v), rounding_mode="floor"), x, v)
    _declines(lambda x, v: x / v.sqrt().sqrt(), x, v, rules=["reciprocal-sqrt-as-rsqrt"])


def test_declines_not_silu():
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    _declines(lambda x, y: x * torch.sigmoid(y), x, y)  # another operand
    _declines(lambda x: x / (1 + torch.exp(x)), x)  # exp(x), not exp(-x)
    _declines(lambda x: x / (2 + torch.exp(-x)), x)  # 2 + exp(-x)
    _declines(lambda x: 2 * x * torch.sigmoid(x), x)  # a factor 2
    _declines(lambda x: x * x * torch.sigmoid(x), x)  # x^2 sigmoid(x)
    _declines(lambda x: x * torch.sigmoid(x) ** 2, x, rules=["written-silu"])
    _declines(lambda x: 1 / (1 + torch.exp(-2 * x)), x)  # sigmoid(2x) spelled with the factor inside: declined


def test_declines_not_gelu_tanh():
    h = torch.randn(3, 4, dtype=torch.float64)

    def erf_gelu(h):
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))

    def rounded_beta(h):
        return 0.5 * h * (1.0 + torch.tanh(0.79788 * (h + 0.044715 * h ** 3)))

    def other_kappa(h):
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.0447 * h ** 3)))

    def square(h):
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 2)))

    def no_half(h):
        return h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))

    def other_var(h, g):
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))

    for fn in (erf_gelu, rounded_beta, other_kappa, square, no_half):
        _declines(fn, h, rules=["written-gelu-tanh"])
    _declines(other_var, h, h.clone(), rules=["written-gelu-tanh"])
    # and the erf GELU (approximate="none") is left alone as an operator
    _declines(lambda h: F.gelu(h), h)


def test_declines_unbiased_and_low_precision_var():
    x = torch.randn(3, 8, dtype=torch.float64)
    _declines(lambda x: x.var(-1), x)  # correction 1 by default
    _declines(lambda x: torch.var_mean(x, -1, correction=1), x)
    _declines(lambda x: torch.var_mean(x, -1), x)
    _declines(lambda x: torch.var(x, -1, correction=0.5), x)
    _declines(lambda x: torch.var_mean(x.to(torch.bfloat16), -1, correction=0), x)


def test_declines_layer_norm():
    x, w, b = torch.randn(2, 3, 8), torch.randn(8), torch.randn(8)
    _declines(lambda x, w, b: F.layer_norm(x, (8,), w, b), x.to(torch.bfloat16), w.to(torch.bfloat16),
              b.to(torch.bfloat16))

    def with_stats(x, w, b):  # the statistics are read (as a backward reads them): the fused op stays
        out, mean, rstd = aten.native_layer_norm(x, [8], w, b, 1e-5)
        return out, mean * rstd

    _declines(with_stats, x, w, b)


def test_declines_mixed_dtype_addcmul():
    b, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float32)
    _declines(lambda b, t1, t2: torch.addcmul(b, t1, t2), b, t, t)


def test_idempotent_and_sources_kept():
    def fn(x, v):
        return x / torch.sqrt(v) + x * torch.sigmoid(x)

    gm = _trace(fn, torch.randn(3, 4), torch.rand(3, 4) + 0.1)
    for n in gm.graph.nodes:
        n.meta["gg_source"] = f"prog.py:{n.name}"
    first = normalize(gm)
    assert first == 2 and normalize(gm) == 0
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    # each new node points at the line of the call it replaces
    assert by_target[aten.rsqrt.default].meta["gg_source"] == "prog.py:sqrt"
    assert by_target[aten.silu.default].meta["gg_source"].startswith("prog.py:mul")


def _every_rule(x, v, t, z):
    """One program in which every rule has something to rewrite (and much it must decline)."""
    a = x ** 3 + x.pow(0.5).abs() + v ** -0.5 + x / torch.sqrt(v) + 1 / torch.sqrt(v)
    b = 1 / (1 + torch.exp(-x)) + x * torch.sigmoid(x) + x / (1 + torch.exp(-x))
    c = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    d = torch.addcmul(x, v, t, value=0.5) + torch.var(x, -1, correction=0, keepdim=True)
    e = F.layer_norm(x, (x.shape[-1],)) + torch.var_mean(t, -1, correction=0, keepdim=True)[1]
    f = torch.view_as_real(torch.view_as_complex(z) * torch.view_as_complex(z.flip(-1))).sum(-1)
    g = torch.linalg.vector_norm(x) + torch.clamp(x, max=2) + torch.maximum(x, torch.zeros_like(x))
    h = torch.where(x > 1.0, 1.0, x) + torch.clamp_min(x, 0.5)
    return a + b + c + d + e + f + g + h


def test_rule_gates_agree_with_the_rules():
    """A rule marked `applies_to(targets)` is asked only about calls of those targets: on a program
    where every rule fires, each marked rule declines every other call (and leaves the graph as it is)."""
    from gg_notebook.ir import norm_rules
    from gg_notebook.ir.pointwise_normal import _Rewriter, may_apply

    xs = (torch.randn(3, 8), torch.rand(3, 8) + 0.1, torch.randn(3, 8), torch.randn(3, 8, 2))
    gm = _trace(_every_rule, *xs)
    rw = _Rewriter(gm)
    rules = [getattr(_Rewriter, name) for name in _Rewriter.RULES if name != "rule_norms"] + list(norm_rules.RULES)
    assert all(getattr(r, "targets", None) for r in rules), "a rule without a gate is asked about every call"
    code = gm.code
    for rule in rules:
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and not may_apply(rule, n.target):
                assert rule(rw, n) is False, (rule.__name__, n.format_node())
        assert gm.code == code, rule.__name__
    fired = normalize(gm)
    assert fired >= 10, gm.meta["gg_normalized"]
    gm.recompile()
    _agree(gm(*xs), _every_rule(*xs), torch.float32)


# ------------------------------------------------------------------------------ commutativity
def test_commutative_operands_one_term():
    S = ExprStore()
    a = S.atom("a", (3, 4), torch.float64)
    b = S.atom("b", (4,), torch.float64)
    two = ((Slot(0), Slot(1)), ())
    for target in (aten.mul.Tensor, aten.add.Tensor, aten.maximum.default, aten.minimum.default):
        spec = OpSpec("ew", str(target), target, two)
        assert S.call(spec, [a, b]) is S.call(spec, [b, a])
        assert S.find("call", spec, [b, a], torch.float64) is S.call(spec, [a, b])
    for target in (aten.sub.Tensor, aten.div.Tensor, aten.pow.Tensor_Tensor, aten.atan2.default):
        spec = OpSpec("ew", str(target), target, two)
        assert S.call(spec, [a, b]) is not S.call(spec, [b, a])
    alpha = OpSpec("ew", "aten.add.Tensor", aten.add.Tensor, ((Slot(0), Slot(1)), (("alpha", 2),)))
    assert S.call(alpha, [a, b]) is not S.call(alpha, [b, a])
    alpha1 = OpSpec("ew", "aten.add.Tensor", aten.add.Tensor, ((Slot(0), Slot(1)), (("alpha", 1),)))
    assert S.call(alpha1, [a, b]) is S.call(alpha1, [b, a])


def test_commuted_is_exact():
    """IEEE addition and multiplication commute bit for bit (the reason the store may reorder)."""
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        a = (torch.randn(1000, generator=g, dtype=torch.float64) * 1e3).to(dtype)
        b = (torch.randn(1000, generator=g, dtype=torch.float64) * 1e-3).to(dtype)
        b[:10] = 0.0
        a[10:20] = float("inf")
        for op in (torch.mul, torch.add, torch.maximum, torch.minimum):
            assert torch.equal(op(a, b).nan_to_num(), op(b, a).nan_to_num())
    S = ExprStore()
    x, y = S.atom("x", (2,), torch.float64), S.atom("y", (2,), torch.float64)
    spec = OpSpec("ew", "aten.mul.Tensor", aten.mul.Tensor, ((Slot(0), Slot(1)), ()))
    assert commuted_args(spec, (y, x)) == ((x, y) if x.id < y.id else (y, x))
    assert commuted_args(spec, (x, y)) == commuted_args(spec, (y, x))


# ------------------------------------------------------------------------------ end to end
def _rms_spec(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rms_rank(x, w):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6))


def _silu_rank(x):
    return x / (1 + torch.exp(-x))


def _problem(spec, rank, inputs, placements):
    return gg.Problem(sequential=spec, distributed=rank, inputs=inputs, placements=placements, world_size=2,
                      expect=[gg.Shard(0)])


def test_bitwise_mode_does_not_normalize():
    x, w = torch.randn(4, 2, 8, dtype=torch.float64), 1 + 0.1 * torch.randn(8, dtype=torch.float64)
    p = _problem(_rms_spec, _rms_rank, [x, w], [gg.Shard(0), gg.Replicate()])
    assert gg.verify(p, capture="inprocess").status is gg.Status.PROVED
    assert gg.verify(p, capture="inprocess", exact="bitwise").status is not gg.Status.PROVED
    p = _problem(F.silu, _silu_rank, [x], [gg.Shard(0)])
    assert gg.verify(p, capture="inprocess").status is gg.Status.PROVED
    assert gg.verify(p, capture="inprocess", exact="bitwise").status is not gg.Status.PROVED


def test_wrong_written_silu_is_refuted():
    def rank(x):
        return x / (1 + torch.exp(x))  # exp(x): not silu

    x = torch.randn(4, 2, 8, dtype=torch.float64)
    r = gg.verify(_problem(F.silu, rank, [x], [gg.Shard(0)]), capture="inprocess")
    assert r.status is gg.Status.REFUTED


def test_layer_norm_with_backward_keeps_the_fused_op():
    """Forward and backward of a layer norm on a sequence shard: the backward reads the statistics,
    so the fused operator stays (and its lemmas prove it as before)."""

    def seq(x, w, b):
        x = x.detach().requires_grad_(True)
        y = F.layer_norm(x, (8,), w, b)
        (g,) = torch.autograd.grad((y * y).sum(), x)
        return y, g

    x, w, b = torch.randn(4, 2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    p = gg.Problem(sequential=seq, distributed=seq, inputs=[x, w, b],
                   placements=[gg.Shard(0), gg.Replicate(), gg.Replicate()], world_size=2,
                   expect=[gg.Shard(0), gg.Shard(0)])
    r = gg.verify(p, capture="inprocess")
    assert r.status is gg.Status.PROVED, r.headline()


_ = dist  # the rank programs above need no collective


# ------------------------------------------------------------------------------ float32 scalars
def test_float32_scalar_operand_rounded():
    """On a float32 tensor, ``ms + 1e-6`` adds float32(1e-6): one call with F.rms_norm's ``add_(ms,
    9.99999997e-07)`` - bit for bit (so also with exact="bitwise")."""

    def spec(x, w):
        return F.rms_norm(x, (x.shape[-1],), w, eps=1e-6)

    def rank(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    x, w = torch.randn(4, 2, 8), 1 + 0.1 * torch.randn(8)
    assert torch.equal(rank(x, w), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 9.999999974752427e-07) * w)
    p = gg.Problem(sequential=spec, distributed=rank, inputs=[x, w], placements=[gg.Shard(0), gg.Replicate()],
                   world_size=2, expect=[gg.Shard(0)])
    for exact in ("real", "bitwise"):
        assert gg.verify(p, capture="inprocess", exact=exact).status is gg.Status.PROVED, exact


def test_float32_rounding_declines():
    from gg_notebook.ir.lower import _other_as_float32
    from gg_notebook.relations.expr import Lit

    assert _other_as_float32((Slot(0), Lit(1e-6))) == (Slot(0), Lit(9.999999974752427e-07))
    assert _other_as_float32((Slot(0), Lit(0.5))) == (Slot(0), Lit(0.5))  # exact already
    assert _other_as_float32((Slot(0), Lit(3))) == (Slot(0), Lit(3))  # ints: not this rule
    assert _other_as_float32((Slot(0), Slot(1))) == (Slot(0), Slot(1))
    # a bfloat16 tensor computes with the scalar in float32, not rounded to bfloat16: not rewritten
    def spec(x):
        return x + 1e-3

    def rank(x):
        return x + float(torch.tensor(1e-3, dtype=torch.bfloat16).item())

    p = gg.Problem(sequential=spec, distributed=rank, inputs=[torch.randn(4, 8, dtype=torch.bfloat16) * 100],
                   placements=[gg.Shard(0)], world_size=2, expect=[gg.Shard(0)])
    assert gg.verify(p, capture="inprocess").status is not gg.Status.PROVED
