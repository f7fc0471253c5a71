"""Sums of log-probabilities over a split class dim: the label-smoothing term of a cross-entropy.

``F.cross_entropy(x, t, label_smoothing=eps)`` adds ``eps / V * (-sum_v log_softmax(x)_v)`` to
``(1 - eps) * nll``. With the classes split across ranks no rank holds ``log_softmax(x)``; ranks
compute the smoothing term from the identity

    sum_v log_softmax(x)_v = sum_v x_v - V * LSE(x)

with a SUM all-reduce of ``x.sum(-1)`` and their log-sum-exp (``lse - total / V``), or sum their
shard of the log-probabilities (``-logp.sum(-1)``, all-reduced). `sum_log_softmax_over_split`
rewrites ``sum_d(log_softmax(concat_d(x_r), d))`` into that formula as a `real_value` (realform),
which the real normal form relates to whatever the ranks computed, *up to an exact factor*: ranks
usually hold the mean ``(lse - total / V)`` (a factor ``-1 / V``), which the following ``neg`` and
``* eps / V`` of the spec cancel. A relation whose factor never cancels stays unclean (a finding,
never a proof).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from gg_notebook.ir.specs import reduce_spec, reduced_dims
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.realform import real_value
from gg_notebook.lemmas.softmax import _peel_rows
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError

aten = torch.ops.aten


def _is_log_softmax(e) -> bool:
    return (e.op == "call" and e.attrs.target is aten._log_softmax.default
            and e.attrs.arg("half_to_float") is False)


def _builder(d: int, keep: bool, n: int):
    def build(S, holes):
        # the sum as the sum of the pieces' sums (what a SUM all-reduce of per-shard sums holds)
        total = S.accum("sum", [S.call(reduce_spec("sum", (d,), keep), [h]) for h in holes])
        lse = S.call(reduce_spec("logsumexp", (d,), keep), [S.cat(holes, d)])
        return S.accum("sum", [total, S.scale(lse, Fraction(-n))])
    return build


def sum_log_softmax_over_split(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    if len(args) != 1 or spec.target is not aten.sum.dim_IntList:
        return
    lsm = args[0]
    if not _is_log_softmax(lsm) or spec.arg("dtype", None) not in (None, lsm.dtype):
        return
    x = lsm.args[0]
    nd = len(x.shape)
    d = int(lsm.attrs.arg("dim")) % nd
    D = reduced_dims(spec.arg("dim"), nd)
    keep = bool(spec.arg("keepdim"))
    if D != (d,) or x.op != "cat" or x.attrs != d or x.dtype is None or not x.dtype.is_floating_point:
        return
    if x.dtype != lsm.dtype:
        return
    n = x.shape[d]
    pieces = list(x.args)
    peeled = _peel_rows(pieces, d)
    for variant in ([peeled] if peeled else []) + [pieces]:
        dd = len(variant[0].shape) - 1 if variant is peeled else d
        try:
            v = real_value(S, variant, _builder(dd, keep, n), "sum of log_softmax", scaled=True)
            yield S.view(v, out_shape) if tuple(v.shape) != tuple(out_shape) else v
        except ShapeError:
            continue


def _case(rng, x, d_sum, keep, split_dim, description, d_lsm=-1):
    """sum(log_softmax(x, d_lsm), d_sum, keepdim) with x split along ``split_dim``; the lemma sees
    log_softmax kept symbolically (deferred), as the engine hands it over."""
    from gg_notebook.ir.specs import softmax_spec

    lsm_v = torch.log_softmax(x, d_lsm)
    spec, _ = C.spec_of(lambda l: l.sum(d_sum, keepdim=keep), lsm_v)
    case = C.make_case(spec, (x,), rng, split={0: split_dim})
    lsm = case.store.call(softmax_spec("log_softmax", d_lsm % x.dim()), [case.args[0]])
    return type(case)(spec, (lsm,), case.values, case.store, description)


def _cases(rng):
    for k in range(7):
        b, s, v = C.dims(rng), C.dims(rng), C.dims(rng, 4, 12)
        dtype = torch.float32 if k == 5 else torch.float64
        x = 3.0 * C.randn(rng, b, s, v, dtype=dtype)
        if k == 3:
            x[0, 0, 1] = 1e4  # a huge logit: log-probabilities of the others near -1e4
        if k == 4:
            x[1, 0, 0] = -float("inf")  # a class of probability 0 (its log-probability is -inf)
        keep = k % 2 == 1
        if k < 6:
            yield _case(rng, x, -1, keep, 2, f"sum of log_softmax over the split vocab, keepdim={keep}, {dtype}")
        else:  # declines: the softmax dim is not the split dim
            yield _case(rng, x, -1, keep, 1, "sum of log_softmax, another dim split (declines)")
    b, v = C.dims(rng), C.dims(rng, 4, 12)
    x = C.randn(rng, b, 3, v)
    yield _case(rng, x, 1, False, 2, "log_softmax over dim 2, sum over dim 1 (declines)", d_lsm=2)
    # F.cross_entropy's flattened [b * s, V] logits
    yield _case(rng, C.randn(rng, b * 3, v), 1, False, 1, "sum of log_softmax of flattened rows")


register(Lemma(
    name="sum-log-softmax-over-split",
    statement="sum_d(log_softmax(concat_d(x_r), d)) = sum_d(concat(x)) - n_d * LSE_d(concat(x)),"
              " matched to a rank value equal to it, or to a multiple of it, over the reals (realform)",
    kinds=("reduce",),
    absorbs=("softmax",),
    plans=sum_log_softmax_over_split,
    cases=_cases,
    conditions=("the log_softmax's input is concatenated along its dim, the only dim summed",
                "half_to_float=False; no dtype= change",
                "matched by the real normal form up to an exact rational factor (an unclean relation until "
                "the factor cancels); exact='real' only"),
    priority=44,
    on=((aten.sum.dim_IntList, ("dim", "keepdim", "dtype"), ()),),
))
