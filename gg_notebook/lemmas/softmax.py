"""Softmax, log_softmax and logsumexp over a dimension split across ranks.

``softmax(concat_d(x_0, .., x_n), d)`` is, piece by piece, ``exp(x_r - LSE_d(concat(x)))``, and
``log_softmax`` is ``x_r - LSE_d(concat(x))``; ``logsumexp`` over a split dim is the log-sum-exp of
the whole row. No rank holds ``LSE`` of the whole row as one operator: each computes it from its
shard with collectives, in its own spelling (a MAX all-reduce of the row maxima and a SUM
all-reduce of ``exp(x - m)``, no stabilizer, all-gathered per-shard ``logsumexp`` values combined
again...). The pieces are `real_value` calls, matched to a rank value equal to them over the reals
by the normal form of `gg_notebook.lemmas.realform` (stabilizers cancel, per-shard sums of
exponentials merge), so one lemma covers every spelling whose value is right, and none other.
"""

from __future__ import annotations

import torch

from gg_notebook.ir.specs import ew_spec, reduce_spec
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register, register_matcher
from gg_notebook.lemmas.realform import match_real_value, real_value
from gg_notebook.relations.expr import Expr, ExprStore, ShapeError

aten = torch.ops.aten


def _lse_keep(S: ExprStore, pieces, d: int) -> Expr:
    return S.call(reduce_spec("logsumexp", (d,), True), [S.cat(pieces, d)])


def softmax_piece_builder(r: int, d: int, log: bool):
    """exp(x_r - LSE_d(cat(x))) (softmax) or x_r - LSE_d(cat(x)) (log_softmax), over holes x."""
    def build(S, holes):
        diff = S.call(ew_spec(aten.sub.Tensor, 2), [holes[r], _lse_keep(S, holes, d)])
        return diff if log else S.call(ew_spec(aten.exp.default, 1), [diff])
    return build


def _peel_rows(pieces, d: int):
    """Pieces that are all views regrouping only the dims before ``d`` (last) of same-shaped
    bases: (bases, the view's leading shape); else None. A reduction over the last dim commutes
    with such a view, so the ranks compute it on the bases."""
    if d != len(pieces[0].shape) - 1 or not all(p.op == "view" for p in pieces):
        return None
    bases = [p.args[0] for p in pieces]
    for p, b in zip(pieces, bases):
        if b.shape[-1] != p.shape[-1] or b.shape[:-1] != bases[0].shape[:-1]:
            return None
    return bases


def softmax_over_split(S: ExprStore, spec, args: tuple, out_shape: tuple):
    if len(args) != 1 or spec.arg("half_to_float") is not False:
        return
    x = args[0]
    nd = len(x.shape)
    d = int(spec.arg("dim")) % nd
    if x.op != "cat" or x.attrs != d or x.dtype is None or not x.dtype.is_floating_point:
        return
    log = spec.target is aten._log_softmax.default
    label = "log_softmax" if log else "softmax"
    pieces = list(x.args)
    peeled = _peel_rows(pieces, d)
    for variant in ([peeled] if peeled else []) + [pieces]:
        dd = len(variant[0].shape) - 1 if variant is peeled else d
        try:
            out = []
            for r, p in enumerate(variant):
                v = real_value(S, variant, softmax_piece_builder(r, dd, log), f"{label} piece {r}")
                out.append(S.view(v, pieces[r].shape) if variant is peeled else v)
            yield S.cat(out, d)
        except ShapeError:
            continue


def _softmax_cases(rng):
    for k in range(6):
        b, s, v = C.dims(rng), C.dims(rng), C.dims(rng, 4, 12)
        x = 3.0 * C.randn(rng, b, s, v)
        log = k % 2 == 1
        fn = (lambda t: torch.log_softmax(t, -1)) if log else (lambda t: torch.softmax(t, dim=2))
        if k < 4:
            yield C.case(fn, (x,), rng, split={0: 2}, description=f"{'log_' if log else ''}softmax, vocab split")
        else:  # declines: split along another dim than the softmax's (concat-commute's business)
            yield C.case(fn, (x,), rng, split={0: 1}, description="softmax over an unsplit dim (declines)")
    # a flattened view of per-rank [b, s, v_r] shards, as F.cross_entropy's log_softmax sees them
    b, s, v = C.dims(rng), C.dims(rng), C.dims(rng, 4, 12)
    case = C.case(lambda t: torch.log_softmax(t, -1), (C.randn(rng, b * s, v),), rng, split={0: 1},
                  description="log_softmax of flattened shards")
    yield case


register(Lemma(
    name="softmax-over-split-dim",
    statement="softmax(concat_d(x_r), d) = concat_d(exp(x_r - LSE_d(concat(x)))),"
              " log_softmax(concat_d(x_r), d) = concat_d(x_r - LSE_d(concat(x)));"
              " each piece matched to a rank value equal to it over the reals (realform)",
    kinds=("softmax",),
    plans=softmax_over_split,
    cases=_softmax_cases,
    conditions=("the input is concatenated along the softmax dim", "half_to_float=False",
                "each piece is related to a rank value with the same real normal form (exp/log/log-sum-exp "
                "identities: stabilizers cancel, per-shard sums of exponentials merge); exact='real' only"),
    priority=45,
    on=((aten._softmax.default, ("dim", "half_to_float"), ()),
        (aten._log_softmax.default, ("dim", "half_to_float"), ())),
))


def logsumexp_over_split(S: ExprStore, spec, args: tuple, out_shape: tuple):
    if len(args) != 1:
        return
    x = args[0]
    nd = len(x.shape)
    D = tuple(sorted({int(d) % nd for d in spec.arg("dim")})) if spec.arg("dim") else tuple(range(nd))
    keep = bool(spec.arg("keepdim"))
    if x.op != "cat" or x.attrs not in D or not x.dtype.is_floating_point:
        return
    pieces = list(x.args)
    peeled = _peel_rows(pieces, x.attrs) if D == (nd - 1,) else None
    if peeled is not None:  # per-rank [.., V_r] shards seen through a view of their leading dims
        last = len(peeled[0].shape) - 1

        def build_peeled(S_, holes):
            return S_.call(reduce_spec("logsumexp", (last,), False), [S_.cat(holes, last)])
        try:
            yield S.view(real_value(S, peeled, build_peeled, "logsumexp"), out_shape)
        except ShapeError:
            pass

    def build(S_, holes):
        return S_.call(reduce_spec("logsumexp", D, keep), [S_.cat(holes, x.attrs)])
    try:
        yield real_value(S, pieces, build, "logsumexp")
    except ShapeError:
        return


def _lse_cases(rng):
    for k in range(4):
        b, s, v = C.dims(rng), C.dims(rng), C.dims(rng, 4, 12)
        x = 3.0 * C.randn(rng, b, s, v)
        keep = k % 2 == 0
        split = {0: 2} if k < 3 else {0: 0}
        yield C.case(lambda t, keep=keep: torch.logsumexp(t, dim=-1, keepdim=keep), (x,), rng, split=split,
                     description=f"logsumexp keepdim={keep} split {split[0]}" + (" (declines)" if k == 3 else ""))


register(Lemma(
    name="logsumexp-over-split-dim",
    statement="logsumexp(concat_d(x_r), D) = LSE_D(concat(x)) for d in D, matched to a rank value equal to it "
              "over the reals (realform)",
    kinds=("reduce",),
    plans=logsumexp_over_split,
    cases=_lse_cases,
    conditions=("the input is concatenated along a reduced dim",
                "related to a rank value with the same real normal form; exact='real' only"),
    priority=45,
    on=((aten.logsumexp.default, ("dim", "keepdim"), ()),),
))

register_matcher("real_value", match_real_value)
