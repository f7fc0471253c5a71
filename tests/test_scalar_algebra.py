"""The scalar normal form (gg_notebook/relations/linear.py) and what it proves.

Unit level: every rule is an identity over the reals, checked numerically on random and adversarial
float64 values; spellings of one value get one form; different values never do. End to end: data
parallel losses and gradients written the ways people write them are proved, and the classic scale
bugs (a missing or doubled division by the world size) are refuted with the factor named.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
from torch.fx.experimental.proxy_tensor import make_fx

import gg_notebook as gg
from gg_notebook.engine.infer import rebuild
from gg_notebook.ir.lower import lower
from gg_notebook.relations.expr import ExprStore, evaluate
from gg_notebook.relations.linear import LinearForms, coefficient


def terms_of(S: ExprStore, fn, *tensors, names=None):
    """Intern the outputs of ``fn`` traced on ``tensors`` as terms over atoms a0, a1, ..."""
    g = lower(make_fx(fn)(*tensors))
    env = {}
    for n in g.nodes:
        if n.op == "input":
            i = n.attrs
            env[n.name] = S.atom((names or {}).get(i, f"a{i}"), tuple(n.shape), n.dtype)
        elif n.op == "const":
            env[n.name] = S.const(n.attrs, n.shape, n.dtype)
        elif n.op == "call":
            env[n.name] = S.call(n.attrs, [env[i.name] for i in n.inputs], n.shape, n.dtype)
        else:
            env[n.name] = rebuild(S, n, [env[i.name] for i in n.inputs])
    return [env[o.name] for o in g.outputs]


def _values(tensors, adversarial: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, t in enumerate(tensors):
        v = torch.randn(t.shape, generator=g, dtype=torch.float64)
        if adversarial:
            v = v * 1e3
            v.view(-1)[:: 3] = 0.0
            v.view(-1)[1:: 4] = -v.view(-1)[1:: 4].abs()
        out[f"a{i}"] = v
    return out


def _eval_form(forms, term, values):
    leaf = lambda e: values[e.attrs[0]]  # noqa: E731
    total = None
    for b, c in forms.of(term):
        v = evaluate(b, leaf) * float(c)
        total = v if total is None else total + v
    return total, evaluate(term, leaf)


SPELLINGS = [
    ("mean", lambda x: x.mean(), [(4, 5)]),
    ("mean over a dim, keepdim", lambda x: x.mean(-1, keepdim=True), [(4, 5)]),
    ("mean over two dims", lambda x: torch.mean(x, dim=(0, 2)), [(2, 3, 4)]),
    ("sum / n", lambda x: x.sum() / 20, [(4, 5)]),
    ("nested sums", lambda x: x.sum(-1).sum(), [(4, 5)]),
    ("sum of a reshape", lambda x: x.reshape(-1).sum(), [(4, 5)]),
    ("sum over a merged group", lambda x: x.view(6, 4).sum(0), [(2, 3, 4)]),
    ("average of two", lambda x, y: (x + y) / 2, [(3, 4), (3, 4)]),
    ("difference with alpha", lambda x, y: torch.sub(x, y, alpha=3), [(3, 4), (3, 4)]),
    ("neg and scale", lambda x: -(x * 0.25), [(3, 4)]),
    ("broadcast add", lambda x, y: x + y, [(3, 4), (4,)]),
    ("matmul of a scaled operand", lambda x, y: x @ (y / 4), [(3, 4), (4, 2)]),
    ("gradient of a mean", lambda x: torch.ones_like(x.sum()).expand(3, 4) / 12 * x, [(3, 4)]),
    ("div by a filled tensor", lambda x: x / torch.full((3, 4), 8.0, dtype=torch.float64), [(3, 4)]),
    ("sum of a scaled average", lambda x, y: ((x + y) * 0.5).sum(0), [(3, 4), (3, 4)]),
    ("mean of a stack of means", lambda x, y: torch.stack([x.mean(0), y.mean(0)]).mean(0), [(3, 4), (2, 4)]),
    ("sum over a concatenated dim", lambda x, y: torch.cat([x, y], 1).sum((0, 1)), [(3, 4), (3, 2)]),
    ("sum over a size-1 dim", lambda x: x.sum(0), [(1, 4)]),
]


@pytest.mark.parametrize("adversarial", [False, True])
@pytest.mark.parametrize("name,fn,shapes", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_every_form_evaluates_to_its_term(name, fn, shapes, adversarial):
    tensors = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    S = ExprStore()
    forms = LinearForms(S)
    (term,) = terms_of(S, fn, *tensors)
    for seed in range(3):
        values = _values(tensors, adversarial, seed)
        got, want = _eval_form(forms, term, values)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


def _key_pair(fa, fb, *shapes, dtype=torch.float64):
    S = ExprStore()
    forms = LinearForms(S)
    tensors = [torch.zeros(s, dtype=dtype) for s in shapes]
    (a,) = terms_of(S, fa, *tensors)
    (b,) = terms_of(S, fb, *tensors)
    return forms.ratio(a, b)


@pytest.mark.parametrize("fa,fb,shapes", [
    (lambda x: x.mean(), lambda x: x.sum() / 20, [(4, 5)]),
    (lambda x: x.mean(), lambda x: x.sum(-1).sum() * 0.05, [(4, 5)]),
    (lambda x: x.sum(), lambda x: x.reshape(-1).sum(), [(4, 5)]),
    (lambda x: x.sum(), lambda x: torch.sum(x.sum(0, keepdim=True), dim=(0, 1)), [(4, 5)]),
    (lambda x, y: (x + y) / 2, lambda x, y: x * 0.5 + y / 2, [(3, 4), (3, 4)]),
    (lambda x, y: (x @ y) / 4, lambda x, y: x @ (y / 4), [(3, 4), (4, 2)]),
    (lambda x: x.sum() / 3, lambda x: x.sum() * (1 / 3), [(3, 4)]),
    (lambda x: x.mean(1, keepdim=True), lambda x: x.sum(1, keepdim=True) / 4, [(3, 4)]),
    (lambda x, y: torch.stack([x.mean(), y.mean()]).mean(), lambda x, y: (x.mean() + y.mean()) / 2, [(3, 4), (3, 4)]),
    (lambda x: x.sum(0), lambda x: x.view(4), [(1, 4)]),
], ids=["mean=sum/n", "mean=nested*0.05", "sum=reshape-sum", "sum=keepdim-nested", "avg", "mm-scale", "1/3",
        "mean-keepdim", "stack-mean", "size-1-sum"])
def test_spellings_of_one_value_share_a_form(fa, fb, shapes):
    assert _key_pair(fa, fb, *shapes) == 1


@pytest.mark.parametrize("fa,fb,shapes,ratio", [
    (lambda x: x.mean(), lambda x: x.sum(), [(4, 5)], Fraction(1, 20)),
    (lambda x: x.sum(0), lambda x: x.sum(1), [(4, 4)], None),
    (lambda x, y: x + y, lambda x, y: x - y, [(3, 4), (3, 4)], None),
    (lambda x: (x + 1.0) / 2, lambda x: x / 2, [(3, 4)], None),
    (lambda x: torch.div(x, 2, rounding_mode="floor"), lambda x: x / 2, [(3, 4)], None),
    (lambda x: x.mean(dtype=torch.float32), lambda x: x.sum() / 20, [(4, 5)], None),
    (lambda x: x.sum() / 3, lambda x: x.sum() * 0.3333, [(3, 4)], Fraction(10000, 9999)),
], ids=["mean!=sum", "sum0!=sum1", "add!=sub", "affine", "floor-div", "dtype=", "1/3!=0.3333"])
def test_different_values_never_share_a_form(fa, fb, shapes, ratio):
    assert _key_pair(fa, fb, *shapes) == ratio


def test_integer_tensors_are_not_normalized():
    S = ExprStore()
    forms = LinearForms(S)
    (t,) = terms_of(S, lambda x: (x + x) * 2, torch.zeros(3, 4, dtype=torch.int64))
    assert forms.trivial(t)


def test_coefficients_are_exact():
    assert coefficient(1 / 3) == Fraction(1, 3)
    assert coefficient(0.1) == Fraction(1, 10)
    assert coefficient(0.3333) == Fraction(3333, 10000)
    assert coefficient(2) == Fraction(2)
    assert coefficient(True) is None and coefficient(float("nan")) is None and coefficient(float("inf")) is None
    assert coefficient(1e-300) == Fraction(1e-300)  # no small rational is that close: its exact value


# ---------------------------------------------------------------------------------------------
# end to end: data-parallel losses and gradients, spelled as people spell them
def mse(x, w):
    return (x @ w).pow(2).mean()


def dp_sum_then_divide(x, w):
    loss = (x @ w).pow(2).mean()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def dp_avg(x, w):
    loss = torch.mean(torch.square(torch.matmul(x, w)))
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss


def dp_global_denominator(x, w):
    loss = (x @ w).pow(2).sum() / (x.shape[0] * dist.get_world_size() * w.shape[1])
    dist.all_reduce(loss)
    return loss


def dp_nested_sums(x, w):
    y = (x @ w) ** 2
    loss = y.sum(dim=-1).sum() / y.numel()
    dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    return loss * (1.0 / dist.get_world_size())


def dp_forgot_divide(x, w):
    loss = (x @ w).pow(2).mean()
    dist.all_reduce(loss)
    return loss  # BUG: the sum of the ranks' means


def dp_divided_twice(x, w):
    loss = (x @ w).pow(2).mean()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss / dist.get_world_size()  # BUG: AVG already divided


def mse_and_grad(x, w):
    loss = (x @ w).pow(2).mean()
    (g,) = torch.autograd.grad(loss, w)
    return loss.detach(), g


def dp_grad_avg(x, w):
    loss = (x @ w).pow(2).mean()
    (g,) = torch.autograd.grad(loss, w)
    dist.all_reduce(g, op=dist.ReduceOp.AVG)
    loss = loss.detach().clone()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss, g


def dp_grad_sum_divide(x, w):
    loss = (x @ w).pow(2).mean()
    (g,) = torch.autograd.grad(loss / dist.get_world_size(), w)  # scaled loss, summed gradients
    dist.all_reduce(g)
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / dist.get_world_size(), g


def dp_grad_not_averaged(x, w):
    loss = (x @ w).pow(2).mean()
    (g,) = torch.autograd.grad(loss, w)
    dist.all_reduce(g)  # BUG: summed, not averaged
    loss = loss.detach().clone()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss, g


def dp_micro_batches(x, w):
    micro = 2
    total = 0.0
    for mb in x.chunk(micro):
        total = total + (mb @ w).pow(2).mean() / micro  # loss scaled by the number of micro-batches
    dist.all_reduce(total)
    return total / dist.get_world_size()


def dp_micro_batches_unscaled(x, w):
    total = 0.0
    for mb in torch.split(x, 2):
        total = total + (mb @ w).pow(2).mean()  # BUG: not divided by the number of micro-batches
    dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total


def dp_grad_accumulation(x, w):
    steps = 2
    grad = torch.zeros_like(w)
    total = torch.zeros(())
    for mb in x.chunk(steps):
        loss = (mb @ w).pow(2).mean() / steps
        (g,) = torch.autograd.grad(loss, w)
        grad = grad + g
        total = total + loss.detach()
    dist.all_reduce(grad, op=dist.ReduceOp.AVG)
    dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total, grad


def _problem(seq, rank, grads=False, exact="real"):
    w = torch.randn(4, 3, requires_grad=grads)
    n_out = 2 if grads else 1
    return gg.Problem(sequential=seq, distributed=rank, inputs=[torch.randn(8, 4), w],
                      placements=[gg.Shard(0), gg.Replicate()], world_size=2, expect=[gg.Replicate()] * n_out)


@pytest.mark.parametrize("rank", [dp_sum_then_divide, dp_avg, dp_global_denominator, dp_nested_sums, dp_micro_batches])
def test_data_parallel_loss_spellings_are_proved(rank):
    r = gg.verify(_problem(mse, rank))
    assert r.status == gg.Status.PROVED, r


@pytest.mark.parametrize("rank,factor", [(dp_forgot_divide, "2"), (dp_divided_twice, "0.5"),
                                         (dp_micro_batches_unscaled, "2")])
def test_a_wrong_scale_is_refuted_and_the_factor_named(rank, factor):
    r = gg.verify(_problem(mse, rank))
    assert r.status == gg.Status.REFUTED, r
    found = [f.message for f in r.findings if f.kind == "scale-factor"]
    assert found and f"are {factor} x the sequential output" in found[0], r


@pytest.mark.parametrize("rank", [dp_grad_avg, dp_grad_sum_divide, dp_grad_accumulation])
def test_data_parallel_gradients_are_proved(rank):
    r = gg.verify(_problem(mse_and_grad, rank, grads=True))
    assert r.status == gg.Status.PROVED, r


def test_summed_gradients_are_refuted():
    r = gg.verify(_problem(mse_and_grad, dp_grad_not_averaged, grads=True))
    assert r.status == gg.Status.REFUTED, r


def test_bitwise_does_not_use_scalar_algebra():
    r = gg.verify(_problem(mse, dp_sum_then_divide), exact="bitwise")
    assert r.status != gg.Status.PROVED, r
