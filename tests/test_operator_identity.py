"""Regression programs for issue #7's operator-identity defects, written as users write them.

Each wrong program here was (or would have been) "proved" by an engine that keyed its facts by
operator name, treated scalars as non-operands, conflated 1 / 1.0 / True, ignored attributes such
as ``ignore_index`` and ``scale_grad_by_freq``, or assumed token ids without saying so. Every wrong
program must not be PROVED (and is refuted by the concrete check); every correct twin is PROVED.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.relations.expr import ExprStore, Lit, OpSpec, Slot

R, S0, S1 = gg.Replicate(), gg.Shard(0), gg.Shard(1)
aten = torch.ops.aten


def check(seq, dist_fn, inputs, placements, expect=(R,), world_size=2, **kw):
    return gg.verify(gg.Problem(sequential=seq, distributed=dist_fn, inputs=inputs, placements=placements,
                                world_size=world_size, expect=expect, **kw))


def _mm_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, generator=g, dtype=dtype) * 3, torch.randn(8, 6, generator=g, dtype=dtype) * 3]


# ---------------------------------------------------------------------------- 1. casts and rounding
def _row_parallel(before_reduce, after_reduce=lambda y: y):
    def dist_fn(x, w):
        y = before_reduce(x @ w)
        dist.all_reduce(y)
        return after_reduce(y)
    return dist_fn


ROUNDING = {
    "round": torch.round,
    "floor_div": lambda y: torch.div(y, 3, rounding_mode="floor"),
    "trunc_div": lambda y: torch.div(y, 2.0, rounding_mode="trunc"),
    "floor_divide_op": lambda y: y // 3,
    "to_int32": lambda y: y.to(torch.int32),
    "to_bfloat16": lambda y: y.to(torch.bfloat16),
    "half_method": lambda y: y.half(),
    "floor": torch.floor,
}


@pytest.mark.parametrize("name", sorted(ROUNDING))
def test_rounding_before_the_reduction_is_refuted(name):
    op = ROUNDING[name]
    wrong = check(lambda x, w: op(x @ w), _row_parallel(op), _mm_inputs(), [S1, S0])
    if name in ("to_bfloat16", "half_method"):
        # rounding each partial to 8/11 bits differs from rounding the sum by less than the
        # format's own precision: never proved, but numbers cannot tell at that tolerance
        assert wrong.status is not gg.Status.PROVED, wrong
    else:
        assert wrong.status is gg.Status.REFUTED, wrong
    right = check(lambda x, w: op(x @ w), _row_parallel(lambda y: y, op), _mm_inputs(), [S1, S0])
    assert right.status is gg.Status.PROVED, right


@pytest.mark.parametrize("spelling", ["double", "to_float64", "float32_to_64_via_to"])
def test_a_widening_cast_commutes_with_the_sum(spelling):
    cast = {"double": lambda y: y.double(), "to_float64": lambda y: y.to(torch.float64),
            "float32_to_64_via_to": lambda y: y.to(dtype=torch.float64)}[spelling]
    r = check(lambda x, w: cast(x @ w), _row_parallel(cast), _mm_inputs(torch.float32), [S1, S0])
    assert r.status is gg.Status.PROVED, r


@pytest.mark.parametrize("spelling", ["div_scalar", "mul_scalar", "true_divide", "neg"])
def test_linear_scalar_ops_before_the_reduction_are_proved(spelling):
    op = {"div_scalar": lambda y: y / 4, "mul_scalar": lambda y: y * 0.5,
          "true_divide": lambda y: torch.true_divide(y, 3), "neg": lambda y: -y}[spelling]
    r = check(lambda x, w: op(x @ w), _row_parallel(op), _mm_inputs(), [S1, S0])
    assert r.status is gg.Status.PROVED, r


# ---------------------------------------------------------------------------- 2. scalars are operands
ADD_SCALAR = {
    "plus_float": lambda y: y + 1.0,
    "plus_int": lambda y: y + 1,
    "torch_add": lambda y: torch.add(y, 0.5),
    "method_add_alpha": lambda y: y.add(2.0, alpha=3),
    "minus": lambda y: y - 1.0,
    "rsub": lambda y: 1.0 - y,
}


@pytest.mark.parametrize("name", sorted(ADD_SCALAR))
def test_a_scalar_added_before_the_reduction_is_refuted(name):
    op = ADD_SCALAR[name]
    wrong = check(lambda x, w: op(x @ w), _row_parallel(op), _mm_inputs(), [S1, S0])
    assert wrong.status is gg.Status.REFUTED, wrong
    right = check(lambda x, w: op(x @ w), _row_parallel(lambda y: y, op), _mm_inputs(), [S1, S0])
    assert right.status is gg.Status.PROVED, right


def test_two_partial_sums_added_are_proved():
    def dist_fn(x, w, v):
        y = x @ w + x @ v
        dist.all_reduce(y)
        return y
    g = torch.Generator().manual_seed(1)
    ins = [torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64),
           torch.randn(8, 6, generator=g, dtype=torch.float64)]
    r = check(lambda x, w, v: x @ w + x @ v, dist_fn, ins, [S1, S0, S0])
    assert r.status is gg.Status.PROVED, r


# ---------------------------------------------------------------------------- 3. literal types
def test_literals_keep_their_type():
    assert Lit(1) != Lit(1.0) and Lit(1) != Lit(True) and Lit(1.0) != Lit(True)
    assert Lit(float("nan")) == Lit(float("nan")) and hash(Lit(2)) == hash(Lit(2))
    a = OpSpec("ew", "aten.add.Tensor", aten.add.Tensor, ((Slot(0), 1), ()))
    b = OpSpec("ew", "aten.add.Tensor", aten.add.Tensor, ((Slot(0), 1.0), ()))
    c = OpSpec("ew", "aten.add.Tensor", aten.add.Tensor, ((Slot(0), True), ()))
    assert len({a, b, c}) == 3
    assert a.arg("other") == 1 and isinstance(b.arg("other"), float) and a.arg("alpha") == 1


def test_dtype_is_part_of_a_terms_identity():
    S = ExprStore()
    x32 = S.atom("x", (3,), torch.float32)
    assert S.view(x32, (3, 1)) is S.view(x32, (3, 1))
    c1 = S.const(OpSpec("const", "c", aten.zeros.default, (((3,),), (("dtype", torch.float32),))), (3,), torch.float32)
    c2 = S.const(OpSpec("const", "c", aten.zeros.default, (((3,),), (("dtype", torch.float32),))), (3,), torch.int64)
    assert c1 is not c2


@pytest.mark.parametrize("spelling", ["plus_true", "or_true"])
def test_bool_plus_true_is_not_bool_plus_one(spelling):
    def seq(m):
        return (m + 1).sum()

    def dist_fn(m):
        return ((m + True) if spelling == "plus_true" else (m | True)).sum()

    m = torch.tensor([[True, False, True], [False, False, True]])
    r = check(seq, dist_fn, [m], [R])
    assert r.status is not gg.Status.PROVED, r


def test_int_hash_computed_in_float_is_not_the_int_hash():
    def seq(ids):
        return (ids * 1_000_003 + 12_345) % (1 << 22)

    def dist_fn(ids):
        return ((ids.to(torch.float32) * 1_000_003 + 12_345) % (1 << 22)).to(torch.int64)

    ids = torch.randint(0, 50_000, (4, 8), generator=torch.Generator().manual_seed(0))
    r = check(seq, dist_fn, [ids], [R])
    assert r.status is not gg.Status.PROVED, r


# ---------------------------------------------------------------------------- 4/5. attributes, domains
V = 16


def _vp_loss(logits, target, ignore: str | None):
    """One rank of a Megatron-style vocab-parallel cross-entropy (written from scratch here)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = logits.shape[-1]
    start, end = rank * n, (rank + 1) * n
    m = logits.max(dim=-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    z = logits - m.unsqueeze(-1)
    outside = (target < start) | (target >= end)
    local = (target - start).masked_fill(outside, 0)
    picked = torch.gather(z, -1, local.unsqueeze(-1)).squeeze(-1)
    picked = picked.masked_fill(outside, 0.0)
    dist.all_reduce(picked)
    sum_exp = z.exp().sum(-1)
    dist.all_reduce(sum_exp)
    loss = sum_exp.log() - picked
    if ignore == "masked_fill":
        loss = loss.masked_fill(target == -100, 0.0)
    elif ignore == "multiply":
        loss = loss * (target != -100).to(loss.dtype)
    elif ignore == "where":
        loss = torch.where(target == -100, torch.zeros_like(loss), loss)
    elif ignore == "index_put":
        loss[target == -100] = 0.0
    return loss


def _ce_inputs(with_padding: bool):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, V, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, V, (2, 6), generator=g)
    if with_padding:
        target[:, -2:] = -100
    return [logits, target]


def _ce_seq(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none").view(target.shape)


def test_loss_that_forgets_ignore_index_is_refuted():
    r = check(_ce_seq, lambda l, t: _vp_loss(l, t, None), _ce_inputs(True), [gg.Shard(-1), R])
    assert r.status is gg.Status.REFUTED, r
    assert r.counterexample is not None


@pytest.mark.parametrize("ignore", ["masked_fill", "multiply", "where", "index_put"])
def test_loss_that_handles_ignore_index_is_proved(ignore):
    r = check(_ce_seq, lambda l, t: _vp_loss(l, t, ignore), _ce_inputs(True), [gg.Shard(-1), R])
    assert r.status is gg.Status.PROVED, r
    assert any("-100" in d for d in r.domain_assumptions), r.domain_assumptions


def test_declared_domain_without_the_sentinel_proves_and_is_listed():
    r = check(_ce_seq, lambda l, t: _vp_loss(l, t, None), _ce_inputs(False), [gg.Shard(-1), R],
              domains={"target": range(0, V)})
    assert r.status is gg.Status.PROVED, r
    assert any("declared" in d and "target" in d for d in r.domain_assumptions), r.domain_assumptions


def test_example_input_outside_the_declared_domain_refutes():
    r = check(_ce_seq, lambda l, t: _vp_loss(l, t, None), _ce_inputs(True), [gg.Shard(-1), R],
              domains={"target": range(0, V)})
    assert r.status is gg.Status.REFUTED, r
    assert any(f.kind == "domain-violation" and "-100" in f.message for f in r.findings), r.findings


def test_ignore_index_zero_as_a_pad_token():
    def seq(logits, target):
        return F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none", ignore_index=0).view(target.shape)

    def dist_fn(logits, target, handle=True):
        loss = _vp_loss(logits, target, None)
        return loss.masked_fill(target == 0, 0.0) if handle else loss

    ins = _ce_inputs(False)
    assert check(seq, dist_fn, ins, [gg.Shard(-1), R]).status is gg.Status.PROVED
    wrong = check(seq, lambda l, t: dist_fn(l, t, False), ins, [gg.Shard(-1), R])
    assert wrong.status is gg.Status.REFUTED, wrong


def test_domains_are_validated():
    ins = _ce_inputs(False)
    with pytest.raises(gg.ProblemError, match="not an input"):
        check(_ce_seq, _ce_seq, ins, [R, R], domains={"targets": range(V)})
    with pytest.raises(gg.ProblemError, match="integer inputs"):
        check(_ce_seq, _ce_seq, ins, [R, R], domains={"logits": range(V)})
    with pytest.raises(gg.ProblemError, match="empty"):
        check(_ce_seq, _ce_seq, ins, [R, R], domains={"target": range(0)})


def _emb_grad(by_freq):
    def seq(ids, w, g):
        out = F.embedding(ids, w, scale_grad_by_freq=by_freq)
        return torch.autograd.grad(out, w, g)[0]

    def dist_fn(ids, w, g):  # data parallel over the batch: local gradient, then all-reduce
        out = F.embedding(ids, w, scale_grad_by_freq=by_freq)
        gw = torch.autograd.grad(out, w, g)[0]
        dist.all_reduce(gw)
        return gw
    return seq, dist_fn


def _emb_inputs():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 5, (4, 6), generator=gen)  # few ids: repeats within and across shards
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    g = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    return [ids, w, g]


def test_embedding_gradient_scaled_by_frequency_is_not_a_sum_over_token_shards():
    seq, dist_fn = _emb_grad(True)
    r = check(seq, dist_fn, _emb_inputs(), [S0, R, S0])
    assert r.status is gg.Status.REFUTED, r
    seq, dist_fn = _emb_grad(False)
    r = check(seq, dist_fn, _emb_inputs(), [S0, R, S0])
    assert r.status is gg.Status.PROVED, r


def test_an_ignored_activation_attribute_is_not_proved():
    def seq(x, w):
        return F.gelu(x @ w, approximate="tanh")

    def dist_fn(x, w):
        return F.gelu(x @ w)  # column parallel, but the exact GeLU

    r = check(seq, dist_fn, _mm_inputs(), [R, S1], expect=(S1,))
    assert r.status is gg.Status.REFUTED, r


# ---------------------------------------------------------------------------- translation validation
def test_every_proof_is_validated_on_fresh_inputs():
    r = check(lambda x, w: (x @ w) / 4, _row_parallel(lambda y: y / 4), _mm_inputs(), [S1, S0])
    assert r.status is gg.Status.PROVED
    assert r.stats["validated"] is True and r.stats["validated_instances"] >= 1


def test_a_lemma_that_lies_is_caught_by_translation_validation(monkeypatch):
    """Break the linearity table (round counted as linear) and check that validation refuses."""
    from gg_notebook.ops import linearity

    monkeypatch.setitem(linearity._TABLE, aten.round.default, linearity.Linearity("separately", ("self",)))
    r = check(lambda x, w: torch.round(x @ w), _row_parallel(torch.round), _mm_inputs(), [S1, S0])
    assert r.status is not gg.Status.PROVED, r
    assert any(f.kind == "validation-failed" for f in r.findings), r.findings


@pytest.mark.parametrize("spelling", ["int_scalars", "float_scalars", "mixed"])
def test_int_and_float_literals_on_a_float_tensor_are_one_call(spelling):
    """On a float tensor ``x * 2`` and ``x * 2.0`` compute the same thing: keeping literal types
    apart must not cost the proof of a program that spells them differently."""
    def seq(x, w):
        return torch.clamp((x @ w) * 2 + 1, min=-3)

    def dist_fn(x, w):
        y = x @ w
        if spelling == "int_scalars":
            return torch.clamp(y * 2 + 1, min=-3)
        if spelling == "float_scalars":
            return torch.clamp(y * 2.0 + 1.0, min=-3.0)
        return torch.clamp(y.mul(2.0).add(1), min=-3)

    r = check(seq, dist_fn, _mm_inputs(), [R, S1], expect=(S1,))
    assert r.status is gg.Status.PROVED, r
