"""Values that a declared id domain makes constant, and selections by a constant mask.

``F.cross_entropy(..., label_smoothing=eps)`` zeroes the smoothing term where ``target ==
ignore_index`` (``masked_fill(-sum(logp), target == -100, 0)``), and other losses test targets
against sentinels the same way. When the problem declares the targets' domain (``Problem.domains``)
and no id of it is the sentinel, ``target == -100`` is all-False *for every input*: no rank computes
it, because it is a constant. Two small lemmas:

* ``constant-on-domain``: a comparison / boolean operator applied to an elementwise function of one
  integer input with a declared domain, evaluated on every id of the domain (domain.py), that takes
  one value everywhere is that value (``full(shape, c)``), whatever the input holds;
* ``select-by-constant-mask``: ``masked_fill(x, M, v)`` with an input-independent mask that is
  all False is ``x`` (all True: ``full(v)`` if v is a number); ``where(M, a, b)`` with a constant
  all-True / all-False mask is ``a`` / ``b`` (shapes and dtypes equal).
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.domain import eval_on_domain
from gg_notebook.relations.domains import IdDomain
from gg_notebook.relations.expr import Expr, ExprStore, OpSpec, walk

aten = torch.ops.aten

MAX_DOMAIN = 1 << 20
_CMP = ("eq", "ne", "lt", "le", "gt", "ge")


def _full(S: ExprStore, shape, value, dtype) -> Expr:
    from gg_notebook.ir.lower import _Full

    return S.const(OpSpec("const", f"full({value})", _Full.of(tuple(shape), value, dtype), ((), ())),
                   tuple(shape), dtype)


def _declared(ctx, name: str):
    if ctx is None:
        return None
    domains = getattr(ctx, "domains", None)
    if isinstance(domains, dict):
        return domains.get(name)
    return getattr(ctx, "domain", None)


def constant_on_domain(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    if spec.unique is not None or spec.out is not None or not args:
        return
    if any(a.dtype is None or a.dtype.is_floating_point or a.dtype.is_complex for a in args):
        return  # integer / boolean arguments only (ids, masks of ids)
    terms = [ctx.to_term(a) if hasattr(ctx, "to_term") else a for a in args]
    try:
        term = S.call(spec, terms)
    except Exception:  # noqa: BLE001 - not a well-formed call
        return
    atoms = {x.id: x for x in walk(term) if x.op in ("atom", "ref")}
    if len(atoms) != 1:
        return
    (var,) = atoms.values()
    if var.op != "atom":
        return
    declared = _declared(ctx, str(var.attrs[0]))
    if declared is None or len(declared) > MAX_DOMAIN:
        return
    domain = ctx.domain_of(var, declared, "constant of an elementwise function of the ids") \
        if hasattr(ctx, "domain_of") else declared
    values = domain.values(var.dtype)
    if values.numel() == 0:
        return
    v = eval_on_domain(term, var, values)
    if v is None or v.numel() != values.numel() or v.dtype != term.dtype:
        return
    flat = v.reshape(-1)
    if not bool((flat == flat[0]).all()):
        return
    yield _full(S, out_shape, flat[0].item(), term.dtype)


def _domain_cases(rng):
    fns = [
        (lambda x: x == -100, "ids == -100 (never: all False)"),
        (lambda x: x >= 0, "ids >= 0 (always: all True)"),
        (lambda x: torch.ne(x, -1), "ids != -1"),
        (lambda x: x == 1, "ids == 1 (varies: declines)"),
        (lambda x: x < 1000, "ids < 1000 (always True)"),
    ]
    for k, (fn, why) in enumerate(fns):
        n, v = C.dims(rng), C.dims(rng, 4, 12)
        declared = IdDomain.range(0, v)
        t = declared.sample((n, 3), rng)
        case = C.case(fn, (t,), rng, description=why)
        yield type(case)(case.spec, case.args, case.values, case.store, why, C.CaseContext(domain=declared))
    # no declared domain: declines
    t = torch.randint(0, 5, (4,), generator=rng)
    case = C.case(lambda x: x == -100, (t,), rng)
    yield type(case)(case.spec, case.args, case.values, case.store, "no declared domain (declines)", C.CaseContext())


register(Lemma(
    name="constant-on-domain",
    statement="f(ids) = full(c) when f is elementwise in one id input and f(v) = c for every id v of its declared domain",
    kinds=("ew",),
    plans=constant_on_domain,
    cases=_domain_cases,
    conditions=("integer / boolean arguments depending on one input, whose domain is declared (Problem.domains)",
                "elementwise (checked by evaluating on every id of the domain); one value on all of them"),
    bitwise_safe=True,
    priority=60,
    needs_context=True,
    # the whole call is evaluated on the domain (every argument is read): comparisons and boolean ops
    on=tuple((getattr(getattr(aten, n), "Scalar"), ("other",), ()) for n in _CMP)
    + tuple((getattr(getattr(aten, n), "Tensor"), (), ()) for n in _CMP)
    + tuple((op, (), ()) for op in (aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default,
                                    aten.logical_not.default, aten.logical_and.default, aten.logical_or.default)),
))


# ---------------------------------------------------------------------------- constant masks
MAX_EVAL = 1 << 12  # a larger constant mask (a causal mask) is read only through its fill value


def _const_mask(m: Expr):
    from gg_notebook.lemmas.loss_reduce import ground_value

    if m.dtype != torch.bool or not m.ground:
        return None
    base = m
    while base.op in ("view", "expand"):
        base = base.args[0]
    fill = getattr(getattr(base.attrs, "target", None), "constant_fill", None) if base.op == "const" else None
    if fill is not None:
        from gg_notebook.relations.expr import untyped

        try:
            value = untyped(fill())
        except Exception:  # noqa: BLE001 - not a uniform constant
            value = None
        if isinstance(value, bool):
            return value
    n = 1
    for s_ in m.shape:
        n *= s_
    if n > MAX_EVAL:
        return None
    v = ground_value(m)
    if v is None or v.numel() == 0:
        return None
    if bool(v.all()):
        return True
    if not bool(v.any()):
        return False
    return None


def select_by_constant_mask(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    target = spec.target
    if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        sx, sm = spec.slot_of("self"), spec.slot_of("mask")
        if sx is None or sm is None:
            return
        x, m = args[sx], args[sm]
        if tuple(x.shape) != tuple(out_shape):
            return
        c = _const_mask(m)
        if c is False:
            yield x
        elif c is True and target is aten.masked_fill.Scalar:
            value = spec.arg("value")
            if isinstance(value, (bool, int, float)) and x.dtype is not None:
                yield _full(S, out_shape, value, x.dtype)
    elif target is aten.where.self:
        sc, sa, sb = spec.slot_of("condition"), spec.slot_of("self"), spec.slot_of("other")
        if None in (sc, sa, sb):
            return
        c = _const_mask(args[sc])
        if c is None:
            return
        pick = args[sa] if c else args[sb]
        other = args[sb] if c else args[sa]
        if tuple(pick.shape) == tuple(out_shape) and pick.dtype == other.dtype:
            yield pick


def _mask_case(rng, fn, tensors, mask, split, description):
    """``fn(*tensors, mask)`` with the mask an input-independent constant of the case's store."""
    spec, order = C.spec_of(fn, *tensors, mask)
    m_slot = order.index(len(tensors))
    slot_tensors = [tensors[o] for o in order if o != len(tensors)]
    split = {s_: split[o] for s_, o in enumerate(o for o in order if o != len(tensors)) if o in split}
    case = C.make_case(spec, slot_tensors, rng, split=split)
    S = case.store
    if bool(mask.all()) or not bool(mask.any()):
        m = _full(S, tuple(mask.shape), bool(mask.reshape(-1)[0]), torch.bool)
    else:
        m = S.const(OpSpec("const", "mask", _ConstMask(tuple(mask.reshape(-1).tolist()), tuple(mask.shape)),
                           ((), ())), tuple(mask.shape), torch.bool)
    args = list(case.args)
    args.insert(m_slot, m)
    return type(case)(spec, tuple(args), case.values, S, description)


class _ConstMask:
    def __init__(self, flat, shape):
        self.flat, self.shape = flat, shape

    def __call__(self, *a, **k):
        return torch.tensor(self.flat, dtype=torch.bool).reshape(self.shape)

    def __eq__(self, other):
        return isinstance(other, _ConstMask) and (self.flat, self.shape) == (other.flat, other.shape)

    def __hash__(self):
        return hash((self.flat, self.shape))


def _mask_cases(rng):
    for k in range(5):
        m, n = C.dims(rng), C.dims(rng)
        x, y = C.randn(rng, m, n), C.randn(rng, m, n)
        zeros, ones = torch.zeros(m, n, dtype=torch.bool), torch.ones(m, n, dtype=torch.bool)
        if k == 0:
            yield _mask_case(rng, lambda a, mk: a.masked_fill(mk, 0.0), (x,), zeros, {0: 0}, "masked_fill, all-False mask")
        elif k == 1:
            yield _mask_case(rng, lambda a, mk: a.masked_fill(mk, 2.5), (x,), ones, {0: 0}, "masked_fill, all-True mask")
        elif k == 2:
            yield _mask_case(rng, lambda a, b, mk: torch.where(mk, a, b), (x, y), ones, {0: 0}, "where, all-True mask")
        elif k == 3:
            yield _mask_case(rng, lambda a, b, mk: torch.where(mk, a, b), (x, y), zeros, {1: 1}, "where, all-False mask")
        else:
            mixed = zeros.clone()
            mixed[0, 0] = True
            yield _mask_case(rng, lambda a, mk: a.masked_fill(mk, 0.0), (x,), mixed, {0: 0},
                             "masked_fill, a mixed constant mask (declines)")


register(Lemma(
    name="select-by-constant-mask",
    statement="masked_fill(x, False, v) = x, masked_fill(x, True, v) = full(v); where(True, a, b) = a, where(False, a, b) = b",
    kinds=("ew",),
    plans=select_by_constant_mask,
    cases=_mask_cases,
    conditions=("the mask is input-independent and uniform (all True or all False)",
                "the selected operand has the result's shape and dtype"),
    bitwise_safe=True,
    priority=60,
    on=((aten.masked_fill.Scalar, ("value",), ()), (aten.masked_fill.Tensor, (), ()), (aten.where.self, (), ())),
))
