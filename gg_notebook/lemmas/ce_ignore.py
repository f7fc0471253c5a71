"""The gradient of a vocabulary-parallel cross-entropy whose targets may be ``ignore_index``.

``F.cross_entropy(x, t, reduction="sum", ignore_index=-100)`` differentiates to, row by row,
``(softmax(x) - onehot(t)) * g`` where ``t != ignore_index`` and ``0`` where it is. Its backward in
the sequential graph is ``_log_softmax_backward_data(nll_loss_backward(g, L, t, ..., total_weight), L)``;
``vocab-cross-entropy-backward`` covers it when no target can be ``ignore_index`` (a declared
domain). Without a declaration the targets may hit the sentinel, and a loss-parallel
implementation zeroes those rows itself (torchtitan's ``_LossParallelCrossEntropy.backward``)::

    grad_input[arange, local(safe_t)] = in_shard(safe_t) - 1       # safe_t = where(t != -100, t, 0)
    d x_r = (grad_input + exp(log_probs_r)) * where(t != -100, g, 0)[:, None]

Two lemmas:

* ``nll-backward-total-weight-unused``: for reduction none/sum ``nll_loss_backward`` does not read
  ``total_weight`` (only the mean divides by it), so the count of non-ignored targets, which no rank
  computes, is kept symbolic (absorbed) and replaced by any constant;
* ``vocab-cross-entropy-backward-ignore``: for reduction sum with an input-independent ``g``,
  ``d x = cat_r(zero_rows_where_equal(scaled_onehot_r(t, g) + g * exp(x_r - LSE(x)), t))``: the
  one-hot part is matched with the ignored rows as don't-care (they are zeroed afterwards, which
  the `zero_rows_where_equal` matcher checks over the whole target domain), the softmax part by the
  real normal form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gg_notebook.ir.specs import ew_spec, reduce_spec
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register, register_matcher
from gg_notebook.lemmas.ce_grad import scaled_onehot_spec
from gg_notebook.lemmas.cross_entropy import _is_log_softmax, _log_softmax_spec, _peel, nll_target_domain
from gg_notebook.lemmas.domain import eval_on_domain
from gg_notebook.lemmas.loss_reduce import ground_value
from gg_notebook.lemmas.masking import kept_rows
from gg_notebook.lemmas.realform import real_value
from gg_notebook.relations.domains import IdDomain
from gg_notebook.relations.expr import Expr, ExprStore, OpSpec, Slot

aten = torch.ops.aten


def _full(S: ExprStore, value: float, shape, dtype) -> Expr:
    from gg_notebook.ir.lower import _Full

    return S.const(OpSpec("const", f"full({value})", _Full.of(tuple(shape), value, dtype), ((), ())),
                   tuple(shape), dtype)


# ---------------------------------------------------------------------------- total weight unused
def total_weight_unused(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    # nll_loss_backward(grad_output, self, target, weight, reduction, ignore_index, total_weight)
    if len(args) != 4 or spec.arg("weight") is not None or spec.arg("reduction") not in (0, 2):
        return
    tw = args[3]
    if tw.ground:
        return  # already a value (nothing to drop; and no rewrite of the rewrite)
    yield S.call(spec, [args[0], args[1], args[2], _full(S, 1.0, tw.shape, tw.dtype)])


def _tw_cases(rng):
    for k in range(4):
        n, v = C.dims(rng), C.dims(rng, 3, 9)
        reduction = (0, 2, 2, 0)[k]
        lsm = torch.log_softmax(C.randn(rng, n, v), -1)
        domain = IdDomain.range(0, v).union(IdDomain.of_values([-100]))
        t = domain.sample((n,), rng)
        t[0] = -100
        g = C.randn(rng, n) if reduction == 0 else C.randn(rng, 1).reshape(())
        tw = aten.nll_loss_forward(lsm, t, None, reduction, -100)[1]
        yield C.case(lambda g_, l_, t_, w_, r=reduction: aten.nll_loss_backward(g_, l_, t_, None, r, -100, w_),
                     (g, lsm, t, tw), rng, description=f"nll_loss_backward reduction {reduction}, an ignored target")


register(Lemma(
    name="nll-backward-total-weight-unused",
    statement="nll_loss_backward(g, x, t, None, r, ii, tw) = nll_loss_backward(g, x, t, None, r, ii, 1)"
              "  for r in {none, sum}",
    kinds=("nll_loss_backward",),
    absorbs=("nll_loss",),
    plans=total_weight_unused,
    cases=_tw_cases,
    conditions=("no class weights", "reduction none or sum (the mean divides by total_weight)"),
    bitwise_safe=True,
    priority=45,
    on=((aten.nll_loss_backward.default, ("weight", "reduction"), ("ignore_index",)),),
))


# ---------------------------------------------------------------------------- zeroed rows
@dataclass(frozen=True)
class ZeroRowsWhereEqual:
    """``x`` with the rows (trailing dim) whose target equals ``value`` set to zero."""

    value: int

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where((t == self.value).unsqueeze(-1), torch.zeros((), dtype=x.dtype), x)


def zero_rows_where_equal_spec(value: int, domain: IdDomain) -> OpSpec:
    return OpSpec("zero_rows_where_equal", f"zero_rows_where_equal[{value}]", ZeroRowsWhereEqual(value),
                  ((Slot(0), Slot(1)), ()), (("value", value), ("domain", domain), ("blame", "consumer")))


def match_zero_rows_where_equal(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """A rank value equal to ``args[0]`` with its rows zeroed exactly where the target equals the
    value: ``x * where(t != v, g, 0)[..., None]`` with g = 1, ``x.masked_fill(..)``, ``x[M] = 0``...,
    the row mask checked on every id of the domain."""
    x_rel, t_rel = args
    x_t, t_t = engine.to_term(x_rel), engine.to_term(t_rel)
    value = spec.param("value")
    domain = spec.param("domain").values(t_rel.dtype)
    want = domain != value
    lead = tuple(x_rel.shape[:-1])
    if tuple(t_rel.shape) != lead:
        return None
    index = engine.index
    for e in index.users_of(x_t):
        keep = kept_rows(e, x_t, lead)
        if keep is None:
            continue
        kv = keep(lambda m: eval_on_domain(m, t_t, domain))
        if kv is None or tuple(kv.shape) != tuple(want.shape) or not bool((kv == want).all()):
            continue
        d = index.realized(e)
        if d is not None:
            return index.ref(d)
    return None


register_matcher("zero_rows_where_equal", match_zero_rows_where_equal)


# ---------------------------------------------------------------------------- the backward
def vocab_ce_backward_ignore(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    if spec.param("fn") != "log_softmax" or len(args) != 2:
        return
    gl, lsm = args
    if gl.op != "call" or gl.attrs.target != aten.nll_loss_backward.default:
        return
    # the log-probabilities: log_softmax(concat(x_r)) kept symbolic, or already related to the ranks'
    # pieces concat(y_r) (a rank that computes its shard of them); _log_softmax_backward_data reads
    # only its output L: d = grad - exp(L) * sum(grad), whatever L is
    symbolic = _is_log_softmax(lsm)
    if not symbolic and not (lsm.op == "cat" and lsm.attrs == len(lsm.shape) - 1):
        return
    nll = gl.attrs
    if nll.arg("weight") is not None or nll.arg("reduction") != 2 or len(gl.args) != 4 or gl.args[1].id != lsm.id:
        return
    if spec.arg("input_dtype") != lsm.dtype:
        return
    g, t = gl.args[0], gl.args[2]
    x = lsm.args[0] if symbolic else lsm
    last = len(x.shape) - 1
    if x.op != "cat" or x.attrs != last or spec.param("dim") != last:
        return
    if symbolic and lsm.attrs.param("dim") != last:
        return
    vocab = x.shape[-1]
    ignore = nll.arg("ignore_index")
    domain = nll_target_domain(ctx, t, vocab, ignore)
    if not isinstance(ignore, int):
        return
    # (ignore_index outside a declared domain: the zeroing is the identity there, and the matchers
    # check it over every id: a rank that still zeroes the sentinel's rows, as torchtitan does)
    if tuple(g.shape) != () or ground_value(g, ctx) is None:
        return  # the factor is compared by value: torch.autograd.grad of the summed loss
    if hasattr(ctx, "to_term"):
        g = ctx.to_term(g)
    pieces, t2 = _peel(S, list(x.args), t)
    lead = tuple(pieces[0].shape[:-1])
    if tuple(t2.shape) != lead:
        return
    plast = len(lead)
    n = len(pieces)
    g_row = S.view(g, (1,) * (plast + 1))

    def soft_builder(r):
        if not symbolic:  # g * exp(y_r): the softmax piece of log-probabilities y
            def build_y(S_, h):
                e = S_.call(ew_spec(aten.exp.default, 1), [h[0]])
                return S_.call(ew_spec(aten.mul.Tensor, 2), [e, h[1]])
            return build_y

        def build(S_, h):
            lse = S_.call(reduce_spec("logsumexp", (plast,), True), [S_.cat(h[:n], plast)])
            e = S_.call(ew_spec(aten.exp.default, 1), [S_.call(ew_spec(aten.sub.Tensor, 2), [h[r], lse])])
            return S_.call(ew_spec(aten.mul.Tensor, 2), [e, h[n]])
        return build

    add = ew_spec(aten.add.Tensor, 2)
    for order in (0, 1):
        outs, off = [], 0
        for r, p in enumerate(pieces):
            hot = S.call(scaled_onehot_spec(off, p.shape[-1], domain, ignore), [t2, g])
            holes = (list(pieces) if symbolic else [p]) + [g_row]
            soft = real_value(S, holes, soft_builder(r), "G * softmax piece")
            both = S.call(add, [hot, soft] if order == 0 else [soft, hot])
            outs.append(S.call(zero_rows_where_equal_spec(ignore, domain), [both, t2]))
            off += p.shape[-1]
        yield S.view(S.cat(outs, plast), out_shape)


def _bwd_cases(rng):
    for k in range(4):
        n, v = C.dims(rng, 3, 7), C.dims(rng, 4, 12)
        ignore = (-100, -100, 0, -100)[k]
        logits = C.randn(rng, n, v)
        domain = IdDomain.range(0, v).union(IdDomain.of_values([ignore]))
        target = domain.sample((n,), rng)
        target[0] = ignore
        if k == 3:
            target[:] = ignore  # every row ignored: a zero gradient
        lsm_v = torch.log_softmax(logits, -1)
        g = torch.ones((), dtype=logits.dtype)
        tw = aten.nll_loss_forward(lsm_v, target, None, 2, ignore)[1]
        gl_v = aten.nll_loss_backward(g, lsm_v, target, None, 2, ignore, tw)

        def lsm_bwd(gl, l):
            return aten._log_softmax_backward_data(gl, l, 1, logits.dtype)

        spec, _ = C.spec_of(lsm_bwd, gl_v, lsm_v)
        nll_spec, _ = C.spec_of(lambda g_, l, t, w, ii=ignore: aten.nll_loss_backward(g_, l, t, None, 2, ii, w),
                                g, lsm_v, target, tw)
        case = C.make_case(nll_spec, (g, logits, target, tw), rng, split={1: 1})
        S_ = case.store
        lsm = S_.call(_log_softmax_spec(), [case.args[1]])
        from gg_notebook.ir.lower import _Full

        g_e = S_.const(OpSpec("const", "full(1.0)", _Full.of((), 1.0, g.dtype), ((), ())), (), g.dtype)
        gl = S_.call(nll_spec, [g_e, lsm, case.args[2], case.args[3]])
        yield type(case)(spec, (gl, lsm), case.values, S_,
                         f"log_softmax backward of a summed nll with ignored targets (ignore_index={ignore}), "
                         f"vocabulary split", C.CaseContext(domain=None))


register(Lemma(
    name="vocab-cross-entropy-backward-ignore",
    statement="log_softmax_backward(nll_backward(g, L, t, sum, ii), L), L = log_softmax(concat(x_r, -1))"
              " = concat_r(zero_rows_where_equal(scaled_onehot_r(t, g) + g * exp(x_r - LSE(x)), t, ii))",
    kinds=("softmax_backward",),
    absorbs=("nll_loss_backward", "softmax"),
    plans=vocab_ce_backward_ignore,
    cases=_bwd_cases,
    conditions=("logits concatenated along the vocabulary (last) dim", "no class weights, reduction sum",
                "ignore_index may occur among the targets (or not: the zeroing is then the identity on the domain)",
                "the upstream gradient is input-independent and compared by value",
                "the one-hot part is matched over the whole target domain, ignored targets don't-care"
                " (their rows are zeroed, which the zero_rows_where_equal matcher checks over the domain)",
                "the softmax part is matched by the real normal form (exact='real' only)"),
    priority=41,
    needs_context=True,
    on=((aten._log_softmax_backward_data.default, ("dim", "input_dtype"), ()),),
))
