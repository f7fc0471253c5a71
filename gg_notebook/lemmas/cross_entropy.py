"""Vocabulary-parallel cross-entropy (Megatron's ``vocab_parallel_cross_entropy``).

The sequential program computes ``nll_loss(log_softmax(logits), target)``; the ranks hold the
logits split along the vocabulary and compute, with any stabilizer m (Megatron: the MAX all-reduce
of the local maxima),

    loss = log(sum_r sum_v exp(x_r - m)) - sum_r masked_pick_r(x_r - m, target)

``vocab-cross-entropy`` is that identity (it holds for every m, and the rewrite uses
``m = max over ranks of amax(x_r)``, the value the ranks compute). It fuses the two sequential
operators: the engine keeps ``log_softmax`` symbolic (deferred) until ``nll_loss`` consumes it.
``masked_pick_r`` is matched to the rank's masked gather by an exhaustive check over all target ids
(see domain.py), whatever spelling the rank used (advanced indexing or gather, ``x[mask] = 0`` or
``masked_fill``).

The same lemma also proposes the loss as a `real_value` (``LSE(concat(x)) - sum_r pick_r(x_r)``, or
with the picks taken from ``x_r - m`` and ``m`` added back), matched by the real normal form of
`realform` to whatever the ranks computed: ``log(s) + m - pick(x)``, per-shard ``logsumexp``
combined, ... A view between log_softmax and nll_loss that keeps the class dim is looked through.
``nll-over-split-classes`` covers ranks that hold their shard of the log-probabilities (DTensor's
``loss_parallel``): ``nll(concat(y_r), t) = -sum_r pick_r(y_r, t)`` for any input y.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gg_notebook.ir.specs import ew_spec, reduce_spec
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register, register_matcher
from gg_notebook.lemmas.domain import agree_where, eval_on_domain, shard_of
from gg_notebook.lemmas.loss_reduce import full_reduce_spec, ground_value, scale_rows_spec
from gg_notebook.lemmas.masking import kept_rows
from gg_notebook.lemmas.realform import real_value
from gg_notebook.relations.domains import IdDomain
from gg_notebook.relations.expr import Expr, ExprStore, OpSpec, ShapeError, Slot

aten = torch.ops.aten


@dataclass(frozen=True)
class MaskedPick:
    """``x[..., t - start]`` where ``t`` falls in this shard's ``[start, start + x.shape[-1])``, else 0."""

    start: int

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        local = t - self.start
        valid = (local >= 0) & (local < x.shape[-1])
        picked = torch.gather(x, -1, local.clamp(0, max(x.shape[-1] - 1, 0)).unsqueeze(-1)).squeeze(-1)
        return torch.where(valid, picked, torch.zeros((), dtype=x.dtype))  # 0, even where x is -inf


def masked_pick_spec(start: int, vocab: int, domain: IdDomain | None = None, ignore: int | None = None) -> OpSpec:
    """``ignore``: the plan zeroes every position whose target is ``ignore`` after a per-position
    combination of the picks (``zero_where_equal``), so the pick's value there does not matter: the
    matcher then accepts a rank value that differs from the pick only at those positions (torchtitan
    picks class 0 for an ignored target, ``where(t != -100, t, 0)``, and zeroes the loss afterwards)."""
    domain = IdDomain.range(0, vocab) if domain is None else domain
    params = (("start", start), ("vocab", vocab), ("domain", domain), ("blame", "consumer"))
    if ignore is not None:
        params += (("ignore", ignore),)
    return OpSpec("masked_pick", f"masked_pick[{start}:]" + ("" if ignore is None else f"~{ignore}"),
                  MaskedPick(start), ((Slot(0), Slot(1)), ()), params)


@dataclass(frozen=True)
class ZeroWhereEqual:
    """``x`` where ``t != value``, zero where ``t == value``: what ``nll_loss`` gives a position
    whose target is ``ignore_index``."""

    value: int

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t == self.value, torch.zeros((), dtype=x.dtype), x)


def zero_where_equal_spec(value: int, domain: IdDomain) -> OpSpec:
    return OpSpec("zero_where_equal", f"zero_where_equal[{value}]", ZeroWhereEqual(value), ((Slot(0), Slot(1)), ()),
                  (("value", value), ("domain", domain), ("blame", "consumer")))


def nll_target_domain(ctx, target: Expr, classes: int, ignore_index) -> IdDomain:
    """The targets a loss over ``classes`` classes may see: what nll_loss accepts (class ids and
    ``ignore_index``), narrowed by a declared domain."""
    accepted = IdDomain.range(0, classes)
    if isinstance(ignore_index, int):
        accepted = accepted.union(IdDomain.of_values([ignore_index]))
    return accepted if ctx is None else ctx.domain_of(target, accepted, "targets of aten.nll_loss")


def _peel(S: ExprStore, pieces, target):
    """Undo a flattening ``[.., V] -> [N, V]``: work in the targets' own (unflattened) shape, where
    the ranks compute. Viewing is data movement, so either shape gives the same values."""
    if target.op == "view":
        lead = tuple(target.args[0].shape)
        if all(p.shape[0] == target.shape[0] for p in pieces):
            return [S.view(p, lead + (p.shape[-1],)) for p in pieces], target.args[0]
    return pieces, target


def _is_log_softmax(e: Expr) -> bool:
    """``e`` is ``aten._log_softmax(x, dim, half_to_float=False)`` (the form the lemmas model)."""
    return (e.op == "call" and e.attrs.target == aten._log_softmax.default
            and e.attrs.arg("half_to_float") is False)


def vocab_cross_entropy(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    if spec.out not in (0, None) or len(args) != 2:
        return
    # nll_loss_forward(self, target, weight, reduction, ignore_index): no class weights; per token
    # (reduction none), or the sum / mean over tokens of the per-token loss (reduction sum / mean)
    reduction = spec.arg("reduction")
    if spec.arg("weight") is not None or reduction not in (0, 1, 2):
        return
    ignore_index = spec.arg("ignore_index")
    lsm, target = args
    if lsm.op == "view" and _is_log_softmax(lsm.args[0]) and lsm.args[0].shape[-1] == lsm.shape[-1]:
        lsm = lsm.args[0]  # a view between log_softmax and nll_loss that keeps the class dim
    if not _is_log_softmax(lsm):
        return
    x = lsm.args[0]
    if x.op != "cat" or x.attrs != len(x.shape) - 1 or lsm.attrs.param("dim") != len(x.shape) - 1:
        return
    vocab = x.shape[-1]
    domain = nll_target_domain(ctx, target, vocab, ignore_index)
    # every per-token loss below is zeroed where the target is ignore_index (when it can occur)
    ignore = ignore_index if ignore_index in domain else None
    pieces, t = _peel(S, list(x.args), target)
    if tuple(t.shape) != tuple(pieces[0].shape[:-1]):
        try:
            t = S.view(t, pieces[0].shape[:-1])  # the targets in the logits' leading shape
        except ShapeError:
            return
    last = len(pieces[0].shape) - 1
    lead = tuple(pieces[0].shape[:-1])
    m = S.accum("max", [S.call(reduce_spec("amax", (last,), False), [p]) for p in pieces])
    mk = S.view(m, lead + (1,))
    sub, exp, log = ew_spec(aten.sub.Tensor, 2), ew_spec(aten.exp.default, 1), ew_spec(aten.log.default, 1)
    shifted = [S.call(sub, [p, mk]) for p in pieces]
    total = S.accum("sum", [S.call(reduce_spec("sum", (last,), False), [S.call(exp, [sh])]) for sh in shifted])
    picks, off = [], 0
    for p, sh in zip(pieces, shifted):
        picks.append(S.call(masked_pick_spec(off, vocab, domain, ignore), [sh, t]))
        off += p.shape[-1]
    loss = S.call(sub, [S.call(log, [total]), S.accum("sum", picks)])
    if ignore_index in domain:
        # positions whose target is ignore_index have loss 0: the ranks must zero them too; the
        # mean divides by the number of kept targets (ignore_mean.py)
        for shape in dict.fromkeys((lead, tuple(target.shape))):
            zeroed = S.call(zero_where_equal_spec(ignore_index, domain), [S.view(loss, shape), S.view(t, shape)])
            yield from _reduced(S, zeroed, S.view(t, shape), reduction, ignore_index, domain, out_shape)
    else:
        yield from _reduced(S, loss, t, reduction, ignore_index, domain, out_shape)
        if isinstance(ignore_index, int) and reduction in (0, 2):
            # a declared domain without the sentinel, and ranks that still zero it (torchtitan): the
            # zeroing is the identity on the domain, which the matcher checks over every id
            for shape in dict.fromkeys((lead, tuple(target.shape))):
                zeroed = S.call(zero_where_equal_spec(ignore_index, domain), [S.view(loss, shape), S.view(t, shape)])
                yield from _reduced(S, zeroed, S.view(t, shape), reduction, ignore_index, domain, out_shape)
    # other spellings, matched by value over the reals (realform): the loss is LSE(x) minus the
    # picked logit, however the ranks stabilize, combine and pick it (log(s) + m - pick(x),
    # log(s) - pick(x - m), per-shard logsumexp gathered and combined ...)
    for shifted in (False, True):
        for keep in ((True, False) if shifted else (False,)):  # keepdim=False last: its failures are blamed
            m = S.accum("max", [S.call(reduce_spec("amax", (last,), keep), [p]) for p in pieces])
            mk = m if keep else S.view(m, lead + (1,))
            src = [S.call(sub, [p, mk]) for p in pieces] if shifted else pieces
            picks, off = [], 0
            for p, sh in zip(pieces, src):
                picks.append(S.call(masked_pick_spec(off, vocab, domain, ignore), [sh, t]))
                off += p.shape[-1]
            for shape in dict.fromkeys((lead, tuple(target.shape))):
                loss = real_value(S, pieces + picks + ([mk] if shifted else []),
                                  _ce_builder(len(pieces), last, shifted, shape), "cross-entropy per token")
                tv = t
                if ignore_index in domain:
                    tv = S.view(t, shape)
                    loss = S.call(zero_where_equal_spec(ignore_index, domain), [loss, tv])
                yield from _reduced(S, loss, tv, reduction, ignore_index, domain, out_shape)


def _reduced(S, loss, t, reduction, ignore_index, domain, out_shape):
    if reduction == 0:
        yield S.view(loss, out_shape)
    elif reduction == 1 and ignore_index in domain:
        # the mean over the kept tokens: sum of the (zeroed) per-token loss / number of kept targets
        from gg_notebook.lemmas.ignore_mean import count_kept_spec

        total = S.call(full_reduce_spec("sum"), [loss])
        count = S.call(count_kept_spec(ignore_index, domain, loss.dtype), [t])
        yield S.call(ew_spec(aten.div.Tensor, 2), [total, count])
    else:
        # sum / mean over every token: a full reduction of the per-token loss (whatever its view)
        yield S.call(full_reduce_spec("mean" if reduction == 1 else "sum"), [loss])


def _ce_builder(n: int, last: int, shifted: bool, shape):
    """LSE_last(cat(x)) - sum_r pick_r (+ m: picks of x - m) over holes x_0..x_n-1, pick_0.., [m]."""
    def build(S, h):
        xs, picks = h[:n], h[n:2 * n]
        lse = S.call(reduce_spec("logsumexp", (last,), False), [S.cat(xs, last)])
        acc = S.call(ew_spec(aten.sub.Tensor, 2), [lse, picks[0]])
        for p in picks[1:]:
            acc = S.call(ew_spec(aten.sub.Tensor, 2), [acc, p])
        if shifted:
            acc = S.call(ew_spec(aten.sub.Tensor, 2), [acc, S.view(h[2 * n], lse.shape)])
        return S.view(acc, shape)
    return build


def match_zero_where_equal(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """Find a rank value equal to ``args[0]`` with the positions whose target equals the ignored
    value zeroed (``loss[t == -100] = 0``, ``masked_fill``, ``where``, ``* (t != -100)``...)."""
    x_rel, t_rel = args
    x_t, t_t = engine.to_term(x_rel), engine.to_term(t_rel)
    value = spec.param("value")
    domain = spec.param("domain").values(t_rel.dtype)
    want = domain != value
    index = engine.index
    shape = tuple(x_rel.shape)
    for e in index.users_of(x_t):
        keep = kept_rows(e, x_t, shape)
        if keep is None:
            continue
        kv = keep(lambda m: eval_on_domain(m, t_t, domain))
        if kv is None or not bool((kv == want).all()):
            continue
        d = index.realized(e)
        if d is not None:
            return index.ref(d)
    if bool(want.all()):  # no id of the domain is the value: x itself, if a rank holds it
        d = index.realized(x_t)
        if d is not None:
            return index.ref(d)
    return None


def match_masked_pick(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """Find a rank value equal to ``masked_pick`` of ``args[0]`` at targets ``args[1]``."""
    x_rel, t_rel = args
    x_t, t_t = engine.to_term(x_rel), engine.to_term(t_rel)
    start, vocab = spec.param("start"), spec.param("vocab")
    v_local = x_rel.shape[-1]
    lead = tuple(x_rel.shape[:-1])
    index = engine.index
    domain = spec.param("domain").values(t_rel.dtype)
    shard = shard_of(domain, start, start + v_local)
    inside = shard.inside
    # targets whose pick the plan zeroes afterwards: the rank's value there does not matter
    ignore = spec.param("ignore", None)
    relevant = domain != ignore if ignore is not None else torch.ones_like(domain, dtype=torch.bool)

    def strip_view(e: Expr, shape) -> Expr | None:
        # the index in any shape of the same elements (reshapes keep row-major order, which is all
        # the domain evaluation needs): Megatron masks the targets as [s, b] and views them flat
        while e.op == "view" and tuple(e.shape) != tuple(shape):
            e = e.args[0]
        return e if math.prod(e.shape) == math.prod(shape) else None

    def index_ok(J: Expr | None) -> bool:
        if J is None:
            return False
        jv = eval_on_domain(J, t_t, domain)
        return jv is not None and shard.local_ids_agree(jv, ignore)

    picks: list[Expr] = []
    for u in [x_t] + [v for v in index.users_of(x_t) if v.op == "view"]:
        for w in index.users_of(u):
            if w.op != "call":
                continue
            name = w.attrs.name
            if name == "aten.index.Tensor" and len(w.args) == 3 and w.args[0].id == u.id and len(u.shape) == 2:
                rows, cols = w.args[1], w.args[2]
                n = u.shape[0]
                if rows.op != "const" or not torch.equal(rows.attrs.call([]), torch.arange(n)):
                    continue
                if index_ok(strip_view(cols, lead)):
                    picks.append(w)
            elif name == "aten.gather.default" and w.args[0].id == u.id:
                if w.attrs.arg("dim") in (-1, len(u.shape) - 1) and index_ok(strip_view(w.args[1], lead)):
                    picks.append(w)
    from gg_notebook.lemmas.onehot import onehot_picks

    for w, kind in onehot_picks(engine, x_t, t_t, domain, start):  # sum(x * onehot(t - start), -1)
        if kind == "masked":
            d = index.realized(w)
            if d is not None:
                return index.ref(d)
        else:
            picks.append(w)
    for p in picks:
        base = engine.store.view(p, lead) if tuple(p.shape) != lead else p
        # the rank may zero the out-of-shard picks in any shape of them (Megatron views the picks
        # as [s, b] before masking): each reshape of the picks keeps their order
        bases = [base] + [v for v in index.users_of(p) if v.op == "view" and v.id != base.id]
        if base.id != p.id:
            bases.append(p)  # zeroed before squeezing the gathered [.., 1] (torchtitan's loss-parallel CE)
        # the picks themselves, or negated first (-logp.gather(..) * mask: a relation up to the factor -1)
        cands = [(b, 1) for b in bases]
        if not getattr(engine, "bitwise", False):
            cands += [(u, -1) for b in bases for u in index.users_of(b)
                      if u.op == "call" and u.attrs.target is aten.neg.default and u.dtype == b.dtype]
        for b, sign in cands:
            for e in [b] + index.users_of(b):
                if e is not b:
                    keep = kept_rows(e, b, tuple(b.shape))
                    kv = None if keep is None else keep(lambda m: eval_on_domain(m, t_t, domain))
                    if kv is None or not agree_where(kv, inside, relevant):
                        continue
                elif bool((~inside & relevant).any()):
                    continue
                d = index.realized(e)
                if d is not None:
                    r = index.ref(d)
                    r = r if tuple(e.shape) == lead else engine.store.view(r, lead)
                    return r if sign == 1 else engine.store.scale(r, -1)
    return None


def _nll_none(ignore_index, reduction=0):
    def nll(lsm, t):
        return aten.nll_loss_forward(lsm, t, None, reduction, ignore_index)[0]
    return nll


def _cases(rng):
    """Targets drawn from the whole accepted domain (sentinels included), several ignore_index
    values (the default -100, a class id such as a pad token 0, one never used), two dtypes, and a
    declared domain without the sentinel."""
    for k in range(10):
        b, s, v = C.dims(rng), C.dims(rng), C.dims(rng, 4, 12)
        dtype = torch.float64 if k % 2 == 0 else torch.float32
        ignore_index = (-100, 0, v + 5, -100, -100, -100, -100, 0, -100, -100)[k]
        declared = IdDomain.range(0, v) if 3 <= k < 6 else None
        # mean / sum with ignore_index possible (k >= 6): sum of the zeroed losses / kept count
        reduction = (0, 0, 0, 0, 1, 2, 1, 1, 2, 1)[k]
        logits = C.randn(rng, b * s, v, dtype=dtype)
        if k == 8:
            logits[0, 1] = -float("inf")  # a class that can never be picked
        domain = declared or IdDomain.range(0, v).union(IdDomain.of_values([ignore_index]))
        target = domain.sample((b * s,), rng)
        if k == 9:
            target[:] = ignore_index  # every target ignored: the mean is 0 / 0 on both sides
        elif k == 6:
            target[0] = ignore_index

        spec, order = C.spec_of(_nll_none(ignore_index, reduction), torch.log_softmax(logits, -1), target)
        assert order == [0, 1]
        case = C.make_case(spec, (logits, target), rng, split={0: 1})
        # the lemma sees log_softmax symbolically (deferred), as the engine hands it over
        lsm = case.store.call(_log_softmax_spec(), [case.args[0]])
        yield type(case)(case.spec, (lsm, case.args[1]), case.values, case.store,
                         f"cross-entropy over a vocabulary split in uneven shards, reduction={reduction}, "
                         f"ignore_index={ignore_index}, "
                         f"{dtype}, targets in {domain.describe()}", C.CaseContext(domain=declared))


def _log_softmax_spec():
    from gg_notebook.ir.specs import softmax_spec
    return softmax_spec("log_softmax", 1)


register(Lemma(
    name="vocab-cross-entropy",
    statement="nll(log_softmax(concat(x_r, -1)), t) = log(sum_r sum(exp(x_r - m))) - sum_r masked_pick_r(x_r - m, t),"
              " m = max_r amax(x_r), or (real_value) LSE(concat(x)) - sum_r masked_pick_r(x_r, t);"
              " reduction sum / mean: full_sum / full_mean of that; mean with ignore_index possible:"
              " full_sum(zero_where_equal(loss, t)) / count_kept(t)",
    kinds=("nll_loss",),
    absorbs=("softmax",),
    plans=vocab_cross_entropy,
    cases=_cases,
    conditions=("logits concatenated along the vocabulary (last) dim", "no class weights",
                "reduction mean with ignore_index possible: sum of the zeroed losses / count_kept(t), the count "
                "matched to a rank's full sum of a 0/1 function of the targets checked on the whole domain",
                "targets range over what nll_loss accepts ([0, V) and ignore_index) or a declared narrower domain",
                "positions whose target is ignore_index are zeroed (when ignore_index is in the domain)",
                "each masked_pick / zero_where_equal piece is matched by an exhaustive check over the domain",
                "a real_value piece is matched by the real normal form (exact='real' only)"),
    priority=40,
    needs_context=True,
    on=((aten.nll_loss_forward.default, ("weight", "reduction", "ignore_index"), ()),),
))
register_matcher("masked_pick", match_masked_pick)
register_matcher("zero_where_equal", match_zero_where_equal)


# ---------------------------------------------------------------------------- nll over split classes
def nll_over_split(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    """nll_loss(concat_C(y_r), t) = -sum_r masked_pick_r(y_r, t): the input needs not be
    log-probabilities (a rank holding its shard of log_softmax, as DTensor's loss_parallel does)."""
    if spec.out not in (0, None) or len(args) != 2:
        return
    reduction = spec.arg("reduction")
    if spec.arg("weight") is not None or reduction not in (0, 1, 2):
        return
    ignore_index = spec.arg("ignore_index")
    y, target = args
    if y.op != "cat" or len(y.shape) != 2 or y.attrs != 1 or not y.dtype.is_floating_point:
        return
    classes = y.shape[-1]
    domain = nll_target_domain(ctx, target, classes, ignore_index)
    ignore = ignore_index if ignore_index in domain else None  # the per-token loss is zeroed there
    pieces, t = _peel(S, list(y.args), target)
    lead = tuple(pieces[0].shape[:-1])
    picks, off = [], 0
    for p in pieces:
        picks.append(S.call(masked_pick_spec(off, classes, domain, ignore), [p, t]))
        off += p.shape[-1]
    for shape in dict.fromkeys((lead, tuple(target.shape))):
        def build(S_, h, shape=shape):
            acc = S_.accum("sum", [S_.view(x, shape) for x in h])
            return S_.call(ew_spec(aten.neg.default, 1), [acc])
        loss = real_value(S, picks, build, "nll per token")
        tv = t
        if ignore_index in domain:
            tv = S.view(t, shape)
            loss = S.call(zero_where_equal_spec(ignore_index, domain), [loss, tv])
        yield from _reduced(S, loss, tv, reduction, ignore_index, domain, out_shape)
        if ignore_index not in domain and isinstance(ignore_index, int) and reduction in (0, 2):
            # ranks that zero the sentinel anyway: the identity on the declared domain (checked)
            tv = S.view(t, shape)
            zeroed = S.call(zero_where_equal_spec(ignore_index, domain), [loss, tv])
            yield from _reduced(S, zeroed, tv, reduction, ignore_index, domain, out_shape)


def _nll_split_cases(rng):
    for k in range(7):
        b, s, v = C.dims(rng), C.dims(rng), C.dims(rng, 4, 12)
        ignore_index = (-100, -100, 0, -100, -100, 3, -100)[k]
        reduction = (0, 1, 0, 2, 1, 2, 1)[k]
        declared = IdDomain.range(0, v) if k in (1, 3) else None
        domain = declared or IdDomain.range(0, v).union(IdDomain.of_values([ignore_index]))
        y = C.randn(rng, b * s, v)
        target = domain.sample((b * s,), rng)
        if k == 6:
            target[:] = ignore_index  # all ignored: NaN on both sides
        spec, order = C.spec_of(_nll_none(ignore_index, reduction), y, target)
        case = C.make_case(spec, (y, target), rng, split={0: 1})
        yield type(case)(case.spec, case.args, case.values, case.store,
                         f"nll over classes split in shards, reduction={reduction}, ignore_index={ignore_index}",
                         C.CaseContext(domain=declared))


register(Lemma(
    name="nll-over-split-classes",
    statement="nll_loss(concat(y_r, -1), t) = -sum_r masked_pick_r(y_r, t); sum / mean: full_sum / full_mean"
              " (mean with ignore_index possible: full_sum(zeroed) / count_kept(t))",
    kinds=("nll_loss",),
    plans=nll_over_split,
    cases=_nll_split_cases,
    conditions=("the input (any values) concatenated along the class dim", "no class weights",
                "reduction mean with ignore_index possible: sum of the zeroed losses / count_kept(t)",
                "positions whose target is ignore_index are zeroed (when ignore_index is in the domain)",
                "each masked_pick is matched by an exhaustive check over the domain"),
    priority=42,
    needs_context=True,
    on=((aten.nll_loss_forward.default, ("weight", "reduction", "ignore_index"), ()),),
))


# ---------------------------------------------------------------------------- total weight
def nll_total_weight(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    """``nll_loss_forward(..)[1]`` without class weights is a constant: 0 for reduction='none',
    else the number of targets, provided no target can be ``ignore_index`` (its domain says so)."""
    if spec.out != 1 or len(args) != 2 or spec.arg("weight") is not None:
        return
    reduction, ignore_index = spec.arg("reduction"), spec.arg("ignore_index")
    lsm, t = args
    if reduction == 0:
        value = 0.0
    else:
        classes = lsm.shape[-1] if len(lsm.shape) else 1
        domain = nll_target_domain(ctx, t, classes, ignore_index)
        if ignore_index in domain:
            return  # the count of non-ignored targets depends on the data
        value = float(max(1, int(torch.tensor(t.shape).prod())))
    from gg_notebook.ir.lower import _Full

    dtype = lsm.dtype
    yield S.const(OpSpec("const", f"full({value})", _Full.of((), value, dtype), ((), ())), (), dtype)


def _bind(reduction):
    def tw(l, t):
        return aten.nll_loss_forward(l, t, None, reduction, -100)[1]
    return tw


def _total_weight_cases(rng):
    for k in range(3):
        n, v = C.dims(rng), C.dims(rng, 3, 9)
        lsm = torch.log_softmax(C.randn(rng, n, v), -1)
        declared = IdDomain.range(0, v) if k != 1 else None  # k == 1: -100 may occur (reduction none only)
        target = (declared or IdDomain.range(0, v).union(IdDomain.of_values([-100]))).sample((n,), rng)
        for reduction in ((0, 1, 2) if declared else (0,)):
            spec, _ = C.spec_of(_bind(reduction), lsm, target)
            case = C.make_case(spec, (lsm, target), rng, description=f"total weight, reduction {reduction}")
            yield type(case)(case.spec, case.args, case.values, case.store, case.description,
                             C.CaseContext(domain=declared))


register(Lemma(
    name="nll-total-weight",
    statement="nll_loss_forward(x, t, weight=None, reduction=r, ignore_index)[1] = 0 if r == none else numel(t)"
              "  (ignore_index outside the targets' domain)",
    kinds=("nll_loss",),
    absorbs=("softmax",),
    plans=nll_total_weight,
    cases=_total_weight_cases,
    conditions=("no class weights",
                "reduction='none', or no target can equal ignore_index (the targets' domain excludes it)"),
    bitwise_safe=True,
    priority=30,
    needs_context=True,
    on=((aten.nll_loss_forward.default, ("weight", "reduction", "ignore_index"), ()),),
))


# ---------------------------------------------------------------------------- backward
@dataclass(frozen=True)
class MaskedOnehotSub:
    """``p - onehot(t - start)`` along the last dim, only where t falls in this shard."""

    start: int

    def __call__(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        local = t - self.start
        valid = (local >= 0) & (local < p.shape[-1])
        onehot = F.one_hot(local.clamp(0, max(p.shape[-1] - 1, 0)), p.shape[-1]).to(p.dtype)
        return p - onehot * valid.unsqueeze(-1).to(p.dtype)


def masked_onehot_sub_spec(start: int, vocab: int, domain: IdDomain | None = None) -> OpSpec:
    domain = IdDomain.range(0, vocab) if domain is None else domain
    return OpSpec("masked_onehot_sub", f"masked_onehot_sub[{start}:]", MaskedOnehotSub(start),
                  ((Slot(0), Slot(1)), ()), (("start", start), ("vocab", vocab), ("domain", domain),
                                             ("blame", "consumer")))


def vocab_cross_entropy_backward(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    """d logits of nll(log_softmax(x), t) with upstream g: (softmax(x) - onehot(t)) * g, per shard."""
    if spec.param("fn") != "log_softmax" or len(args) != 2:
        return
    gl, lsm = args
    if gl.op != "call" or gl.attrs.target != aten.nll_loss_backward.default:
        return
    if not _is_log_softmax(lsm):
        return
    # nll_loss_backward(grad, self, target, weight, reduction, ignore_index, total_weight)
    nll = gl.attrs
    reduction = nll.arg("reduction")
    if nll.arg("weight") is not None or reduction not in (0, 1, 2) or len(gl.args) != 4 or gl.args[1].id != lsm.id:
        return
    if spec.arg("input_dtype") != lsm.dtype:
        return  # a cast in the backward: the rewrite would not round the same way
    g, t = gl.args[0], gl.args[2]
    x = lsm.args[0]
    last = len(x.shape) - 1
    if x.op != "cat" or x.attrs != last or spec.param("dim") != last or lsm.attrs.param("dim") != last:
        return
    vocab = x.shape[-1]
    domain = nll_target_domain(ctx, t, vocab, nll.arg("ignore_index"))
    if nll.arg("ignore_index") in domain:
        return  # ignored positions get a zero gradient: no piece-wise form for that yet
    pieces, t2 = _peel(S, list(x.args), t)
    lead = tuple(pieces[0].shape[:-1])
    plast = len(lead)
    for keep in (False, True):  # the row maximum with or without keepdim (the ranks' spelling)
        m = S.accum("max", [S.call(reduce_spec("amax", (plast,), keep), [p]) for p in pieces])
        mk = m if keep else S.view(m, lead + (1,))
        yield from _ce_backward_plan(S, pieces, mk, lead, plast, gl, g, t2, reduction, vocab, domain, out_shape, ctx)
    if reduction in (1, 2):
        # autograd of a written-out forward: the gather's and the exp's gradients, added (ce_grad.py)
        from gg_notebook.lemmas.ce_grad import split_plans

        ones = (1,) * (len(lead) + 1)
        gk = S.view(g, ones) if reduction == 2 else S.call(ew_spec(aten.div.Tensor, 2),
                                                            [S.view(g, ones), S.view(gl.args[3], ones)])
        if ground_value(gk, ctx) is not None:
            gk = ctx.to_term(gk) if hasattr(ctx, "to_term") else gk
            yield from split_plans(S, pieces, lead, plast, gk, domain, t2, out_shape)


def _ce_backward_plan(S, pieces, mk, lead, plast, gl, g, t2, reduction, vocab, domain, out_shape, ctx):
    sub, exp = ew_spec(aten.sub.Tensor, 2), ew_spec(aten.exp.default, 1)
    div, mul = ew_spec(aten.div.Tensor, 2), ew_spec(aten.mul.Tensor, 2)
    exps = [S.call(exp, [S.call(sub, [p, mk])]) for p in pieces]
    for keep in (False, True):  # the row sum with or without keepdim
        total = S.accum("sum", [S.call(reduce_spec("sum", (plast,), keep), [e]) for e in exps])
        tk = total if keep else S.view(total, lead + (1,))
        yield from _ce_backward_rows(S, pieces, exps, tk, lead, plast, gl, g, t2, reduction, vocab, domain,
                                     out_shape, ctx)


def _ce_backward_rows(S, pieces, exps, tk, lead, plast, gl, g, t2, reduction, vocab, domain, out_shape, ctx):
    div, mul = ew_spec(aten.div.Tensor, 2), ew_spec(aten.mul.Tensor, 2)
    # the factor of every row: g (none), g broadcast (sum), g / total_weight (mean)
    ones = (1,) * (len(lead) + 1)
    if reduction == 0:
        gk = S.view(g, lead + (1,))
    elif reduction == 2:
        gk = S.view(g, ones)
    else:
        gk = S.call(div, [S.view(g, ones), S.view(gl.args[3], ones)])
    # an input-independent factor (torch.autograd.grad of the loss itself) is compared by value
    scale = mul
    if ground_value(gk, ctx) is not None:
        scale = scale_rows_spec()
        if hasattr(ctx, "to_term"):
            gk = ctx.to_term(gk)  # refs to rank constants read as the constants themselves
    outs, off = [], 0
    for p, e in zip(pieces, exps):
        soft = S.call(div, [e, tk])
        d = S.call(masked_onehot_sub_spec(off, vocab, domain), [soft, t2])
        outs.append(S.call(scale, [d, gk]))
        off += p.shape[-1]
    yield S.view(S.cat(outs, plast), out_shape)


def _view_root(e: Expr) -> Expr:
    while e.op == "view":
        e = e.args[0]
    return e


def _picks_at(picked: Expr, p2: Expr, rows: Expr, cols: Expr) -> bool:
    """Is ``picked`` ``p2[rows, cols]`` (rows = arange): spelled as that index, or as the gather the
    lowering makes of it, ``p2.gather(1, cols.view(n, 1)).view(n)``?"""
    if picked.op == "call" and picked.attrs.name == "aten.index.Tensor":
        return [a.id for a in picked.args] == [p2.id, rows.id, cols.id]
    if picked.op != "view" or tuple(picked.shape) != tuple(cols.shape):
        return False
    g = picked.args[0]
    if g.op != "call" or g.attrs.name != "aten.gather.default" or len(g.args) != 2 or g.args[0].id != p2.id:
        return False
    if g.attrs.arg("dim") != 1 or g.attrs.arg("sparse_grad", False) is not False:
        return False
    idx = g.args[1]
    return tuple(idx.shape) == (cols.shape[0], 1) and _view_root(idx).id == _view_root(cols).id and \
        math.prod(_view_root(cols).shape) == cols.shape[0]


def match_masked_onehot_sub(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """Find a rank value equal to ``p - onehot(t - start)`` (in-shard targets only), written as
    ``p2d[arange, J] -= U`` (index_put of the picked entries minus U)."""
    p_rel, t_rel = args
    p_t, t_t = engine.to_term(p_rel), engine.to_term(t_rel)
    start, vocab = spec.param("start"), spec.param("vocab")
    v_local = p_rel.shape[-1]
    lead = tuple(p_rel.shape[:-1])
    n = 1
    for s_ in lead:
        n *= s_
    index = engine.index
    S = engine.store
    domain = spec.param("domain").values(t_rel.dtype)
    shard = shard_of(domain, start, start + v_local)
    inside = shard.inside
    from gg_notebook.lemmas.onehot import onehot_subs

    for w in onehot_subs(engine, p_t, t_t, domain, start):  # p - onehot(t - start) * in_shard
        d = index.realized(w)
        if d is not None:
            return index.ref(d)
    p2 = S.view(p_t, (n, v_local))
    for w in index.users_of(p2):
        if w.op == "call" and w.attrs.kind == "pick_update" and w.attrs.param("op") == "sub" and \
                len(w.args) == 3 and w.args[0].id == p2.id:
            # the same write, fused by the lowering (ir/pick_update.py): where(onehot(J), p2 - U, p2)
            jv, uv = eval_on_domain(w.args[1], t_t, domain), eval_on_domain(w.args[2], t_t, domain)
            if jv is None or uv is None or not shard.local_ids_agree(jv):
                continue
            if not bool((uv == inside.to(uv.dtype)).all()):
                continue
            d = index.realized(w)
            if d is not None:
                return S.view(index.ref(d), lead + (v_local,))
            continue
        if w.op != "call" or w.attrs.name != "aten.index_put.default" or len(w.args) != 4 or w.args[0].id != p2.id:
            continue
        if w.attrs.arg("accumulate") is not False:
            continue  # accumulate=True has other semantics
        rows, cols, vals = w.args[1], w.args[2], w.args[3]
        if rows.op != "const" or not torch.equal(rows.attrs.call([]), torch.arange(n)):
            continue
        jv = eval_on_domain(cols, t_t, domain)
        if jv is None or not shard.local_ids_agree(jv):
            continue
        # vals == p2[arange, J] - U(t)
        if vals.op != "call" or vals.attrs.name != "aten.sub.Tensor" or len(vals.args) != 2:
            continue
        picked, u = vals.args
        if not _picks_at(picked, p2, rows, cols):
            continue
        uv = eval_on_domain(u, t_t, domain)
        if uv is None or not bool((uv == inside.to(uv.dtype)).all()):
            continue
        d = index.realized(w)
        if d is not None:
            return S.view(index.ref(d), lead + (v_local,))
    return None


def _backward_cases(rng):
    from gg_notebook.ir.lower import _Full

    for k in range(5):
        n, v = C.dims(rng), C.dims(rng, 4, 12)
        reduction = (0, 0, 0, 1, 2)[k]
        logits = C.randn(rng, n, v)
        target = torch.randint(0, v, (n,), generator=rng)
        g = C.randn(rng, n) if reduction == 0 else C.randn(rng, 1).reshape(())
        lsm_v = torch.log_softmax(logits, -1)
        tw = aten.nll_loss_forward(lsm_v, target, None, reduction, -100)[1]
        gl_v = aten.nll_loss_backward(g, lsm_v, target, None, reduction, -100, tw)

        def lsm_bwd(gl, l):
            return aten._log_softmax_backward_data(gl, l, 1, torch.float64)

        spec, order = C.spec_of(lsm_bwd, gl_v, lsm_v)
        nll_spec, _ = C.spec_of(lambda g, l, t, w, r=reduction: aten.nll_loss_backward(g, l, t, None, r, -100, w),
                                g, lsm_v, target, tw)
        case = C.make_case(nll_spec, (g, logits, target, tw), rng, split={1: 1})
        S_ = case.store
        lsm = S_.call(_log_softmax_spec(), [case.args[1]])
        g_e, tw_e = case.args[0], case.args[3]
        if reduction == 1:
            # torch.autograd.grad(loss): an input-independent upstream gradient and token count
            gval, twval = float(g), float(tw)
            g_e = S_.const(OpSpec("const", f"full({gval})", _Full.of((), gval, g.dtype), ((), ())), (), g.dtype)
            tw_e = S_.const(OpSpec("const", f"full({twval})", _Full.of((), twval, tw.dtype), ((), ())), (), tw.dtype)
        gl = S_.call(nll_spec, [g_e, lsm, case.args[2], tw_e])
        yield type(case)(spec, (gl, lsm), case.values, S_,
                         f"log_softmax backward of nll, vocabulary split, reduction={reduction}",
                         C.CaseContext(domain=IdDomain.range(0, v)))


register(Lemma(
    name="vocab-cross-entropy-backward",
    statement="log_softmax_backward(nll_backward(g, L, t), L), L = log_softmax(concat(x_r, -1))"
              " = concat_r((exp(x_r - m) / sum_r sum(exp(x_r - m)) - onehot_r(t)) * G),"
              " G = g (none), g (sum), g / total_weight (mean)",
    kinds=("softmax_backward",),
    absorbs=("nll_loss_backward", "softmax"),
    plans=vocab_cross_entropy_backward,
    cases=_backward_cases,
    conditions=("logits concatenated along the vocabulary (last) dim", "no class weights (any reduction)",
                "an input-independent factor G is matched by value (scale_rows)",
                "ignore_index lies outside the targets' domain (declared, or outside [0, V) and unused)",
                "input_dtype of the backward is the log-probabilities' dtype",
                "each masked one-hot piece is matched by an exhaustive check over the domain"),
    priority=40,
    needs_context=True,
    on=((aten._log_softmax_backward_data.default, ("dim", "input_dtype"), ()),),
))
register_matcher("masked_onehot_sub", match_masked_onehot_sub)
