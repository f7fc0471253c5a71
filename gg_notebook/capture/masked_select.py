"""Boolean-mask selections that only feed shape-independent reductions, rewritten to fixed shapes.

``x[mask]``, ``torch.masked_select(x, mask)`` and ``x[mask.nonzero(as_tuple=True)]`` keep only the
selected elements: their shape depends on the mask's values, and the IR (like the rest of
gg_notebook) is built on static shapes. Many losses use the selection only through a reduction
whose value does not depend on where the selected elements end up: ``loss[valid].mean()``,
``x[mask].sum()``, ``x[mask].numel()``. Those are rewritten here, on the traced fx graph, into the
fixed-shape spellings that mean the same number:

    sum(x[m])       ->  sum(where(m, x, 0))                       (dtype of the original sum)
    numel(x[m])     ->  sum(m)                                    (int64, times the kept dims)
    mean(x[m])      ->  sum(where(m, x, 0)) / sum(m)              (0/0 = NaN when nothing is kept)
    x[m].sum(0)     ->  sum(where(m[..., None], x, 0), dims of m)  (rows of x selected by m)

The program is traced with an unbacked-size shape environment (the selection's length is a
symbol ``u0``); after the rewrite no node may still depend on such a symbol. A selection used in
any other way (returned, multiplied with another tensor, indexed, passed to a collective) is
refused with the usual message (which spells the fixed-shape rewrite for the user).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten

_KEPT_META = ("gg_source", "gg_frames", "gg_source_kind", "gg_backward", "gg_shim", "stack_trace")


class Refused(Exception):
    """A data-dependent shape that is not only reduced; ``node`` is where it comes from."""

    def __init__(self, node: fx.Node, why: str):
        super().__init__(why)
        self.node = node
        self.why = why


def _unbacked(v: Any) -> bool:
    """Does ``v`` (a meta val: tensor, SymInt, tuple) mention an unbacked size symbol?"""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    if isinstance(v, (list, tuple)):
        return any(_unbacked(x) for x in v)
    if isinstance(v, torch.Tensor):
        return any(isinstance(s, torch.SymInt) and free_unbacked_symbols(s) for s in v.shape)
    if isinstance(v, torch.SymInt):
        return bool(free_unbacked_symbols(v))
    return False


def has_unbacked(gm: fx.GraphModule) -> bool:
    return any(_unbacked(n.meta.get("val")) for n in gm.graph.nodes)


def has_unbacked_val(n: fx.Node) -> bool:
    return _unbacked(n.meta.get("val"))


class _Selection:
    """``x`` restricted to the positions where ``mask`` holds: the selected positions replace the
    dims ``lead .. lead + mask.ndim - 1`` of ``x`` by one dim of data-dependent length (at ``lead``).
    ``shape`` is the static shape x and mask broadcast to (masked_select), else x's shape."""

    def __init__(self, node: fx.Node, x: fx.Node, mask: fx.Node, lead: int, shape: tuple[int, ...], bcast: bool):
        self.node, self.x, self.mask, self.lead, self.shape, self.bcast = node, x, mask, lead, shape, bcast

    @property
    def mdim(self) -> int:
        """How many dims of ``shape`` the selection replaces (all of them for masked_select)."""
        return len(self.shape) if self.bcast else self.mask.meta["val"].dim()

    @property
    def rest(self) -> tuple[int, ...]:
        return self.shape[self.lead + self.mdim:]

    def out_dims(self) -> int:
        return len(self.shape) - self.mdim + 1


def _val(n) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _static(shape) -> bool:
    return all(isinstance(s, int) for s in shape)


def _nonzero_components(idx: list) -> fx.Node | None:
    """The mask ``m`` if ``idx`` is exactly ``m.nonzero().unbind(1)`` (``m.nonzero(as_tuple=True)``)."""
    if not idx or not all(isinstance(i, fx.Node) for i in idx):
        return None
    base = None
    for k, g in enumerate(idx):
        if g.target is not operator.getitem or g.args[1] != k:
            return None
        ub = g.args[0]
        if not isinstance(ub, fx.Node) or ub.target is not aten.unbind.int:
            return None
        if (ub.args[1] if len(ub.args) > 1 else ub.kwargs.get("dim", 0)) != 1:
            return None  # nonzero(as_tuple=True) is the columns of nonzero()
        nz = ub.args[0]
        if not isinstance(nz, fx.Node) or nz.target is not aten.nonzero.default:
            return None
        if base is not None and base is not nz:
            return None
        base = nz
    m = base.args[0]
    mv = _val(m)
    if not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool or mv.dim() != len(idx):
        return None
    return m


def _selection(n: fx.Node) -> _Selection | None:
    """The selection ``n`` computes, if it is one of the recognized spellings."""
    if n.op != "call_function":
        return None
    if n.target is aten.masked_select.default:
        x, m = n.args[0], n.args[1]
        xv, mv = _val(x), _val(m)
        if not (isinstance(xv, torch.Tensor) and isinstance(mv, torch.Tensor) and mv.dtype == torch.bool):
            return None
        try:
            shape = tuple(torch.broadcast_shapes(tuple(xv.shape), tuple(mv.shape)))
        except RuntimeError:
            return None
        if not _static(shape):
            return None
        return _Selection(n, x, m, 0, shape, True)
    if n.target is aten.index.Tensor:
        x, idx = n.args[0], list(n.args[1])
        xv = _val(x)
        if not isinstance(xv, torch.Tensor) or not _static(xv.shape):
            return None
        lead = 0
        while lead < len(idx) and idx[lead] is None:
            lead += 1
        rest = idx[lead:]
        if not rest or any(i is None for i in rest):
            return None
        if len(rest) == 1 and isinstance(rest[0], fx.Node) and getattr(_val(rest[0]), "dtype", None) == torch.bool:
            m = rest[0]
        else:
            m = _nonzero_components(rest)
            if m is None:
                return None
        mv = _val(m)
        if tuple(mv.shape) != tuple(xv.shape[lead:lead + mv.dim()]):
            return None  # a mask that does not cover those dims exactly (torch raises on real values)
        return _Selection(n, x, m, lead, tuple(xv.shape), False)
    return None


class _Builder:
    """Inserts new nodes before ``anchor``, with the meta (source line) of ``like``; their ``val``
    is computed on the fake values under ``mode``."""

    def __init__(self, g: fx.Graph, anchor: fx.Node, like: fx.Node, mode):
        self.g, self.anchor, self.like, self.mode = g, anchor, like, mode

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.g.inserting_before(self.anchor):
            n = self.g.call_function(target, tuple(args), dict(kwargs))
        for k in _KEPT_META:
            if k in self.like.meta:
                n.meta[k] = self.like.meta[k]
        vals = [_val(a) if isinstance(a, fx.Node) else a for a in args]
        kw = {k: (_val(v) if isinstance(v, fx.Node) else v) for k, v in kwargs.items()}
        with self.mode:
            n.meta["val"] = target(*vals, **kw)
        return n


def _dims(arg, ndim: int) -> list[int] | None:
    """Normalized reduction dims (None: all)."""
    if arg is None:
        return None
    if isinstance(arg, int):
        arg = [arg]
    arg = list(arg)
    if not arg:
        return None
    return sorted({d % ndim for d in arg}) if ndim else []


def _reduction(u: fx.Node, sel: _Selection):
    """(fn, dims over the selection's own dims or None for all, keepdim, dtype) of a reduction user
    that reads the selection only as its input, else None."""
    nd = sel.out_dims()
    if u.target in (aten.sum.default, aten.mean.default):
        if len(u.args) != 1 or set(u.kwargs) - {"dtype"}:
            return None
        fn = "sum" if u.target is aten.sum.default else "mean"
        return fn, None, False, u.kwargs.get("dtype")
    if u.target in (aten.sum.dim_IntList, aten.mean.dim):
        if u.args[0] is not sel.node or any(a is sel.node for a in u.args[1:]) or set(u.kwargs) - {"dtype", "keepdim"}:
            return None
        fn = "sum" if u.target is aten.sum.dim_IntList else "mean"
        dims = _dims(u.args[1] if len(u.args) > 1 else None, nd)
        keepdim = u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim", False)
        dtype = u.args[3] if len(u.args) > 3 else u.kwargs.get("dtype")
        if dims is not None and sel.lead not in dims:
            return None  # a reduction that keeps the selected dim: its shape is still data-dependent
        return fn, dims, bool(keepdim), dtype
    return None


def _lower_one(gm: fx.GraphModule, sel: _Selection) -> None:
    g = gm.graph
    xv = _val(sel.x)
    mv = _val(sel.mask)
    k, md = sel.lead, sel.mdim
    users = list(sel.node.users)
    plans = []
    for u in users:
        if u.op != "call_function":
            raise Refused(sel.node, "it is returned")
        red = _reduction(u, sel)
        if red is not None:
            plans.append(("reduce", u, red))
            continue
        if _pointwise_of(u, sel.node):
            plans.append(("pointwise", u, None))
            continue
        if u.target is aten.sym_numel.default:
            plans.append(("numel", u, None))
            continue
        if u.target is aten.sym_size.int and len(u.args) == 2 and isinstance(u.args[1], int):
            d = u.args[1] % sel.out_dims()
            if d == k:
                plans.append(("size", u, None))
                continue
        raise Refused(sel.node, f"it is used by {getattr(u.target, '__name__', u.target)}")
    mode = xv.fake_mode
    for kind, u, red in plans:
        b = _Builder(g, u, u, mode)
        if kind == "pointwise":
            # f(x[m]) is f(x)[m]: f on every element of x, then the same selection, lowered in turn
            # (f of an unselected element may be inf or NaN: `where` never lets it through)
            fx_ = b(u.target, *[sel.x if a is sel.node else a for a in u.args], **u.kwargs)
            _lower_one(gm, _Selection(u, fx_, sel.mask, k, sel.shape if sel.bcast else tuple(_val(fx_).shape),
                                      sel.bcast))
            continue
        # the mask, viewed so that it broadcasts against x: [1]*lead + mask.shape + [1]*rest
        # (masked_select: where broadcasts mask and x the way masked_select does)
        mview = sel.mask
        if not sel.bcast and (k or sel.rest):
            mview = b(aten.view.default, sel.mask, [1] * k + list(mv.shape) + [1] * len(sel.rest))
        if kind in ("numel", "size") or (kind == "reduce" and red[0] == "mean"):
            mfull = sel.mask
            if sel.bcast and tuple(mv.shape) != sel.shape:
                mfull = b(aten.expand.default, sel.mask, list(sel.shape))
            count = b(aten.sum.default, mfull)  # int64: the number of selected positions
        if kind in ("numel", "size"):
            extra = 1
            if kind == "numel" and not sel.bcast:
                for s in sel.shape[:k] + sel.rest:
                    extra *= s
            value = count if extra == 1 else b(aten.mul.Tensor, count, extra)
            _replace_symint(g, u, value, sel)
            continue
        fn, dims, keepdim, dtype = red
        zero = b(aten.scalar_tensor.default, 0, dtype=xv.dtype, layout=torch.strided, device=xv.device)
        kept = b(aten.where.self, mview, sel.x, zero)
        # the selection's dims -> x's dims (the selected dim stands for the mask's dims)
        if dims is None:
            xdims = None
        else:
            xdims = []
            for d in dims:
                if d < k:
                    xdims.append(d)
                elif d == k:
                    xdims.extend(range(k, k + md))
                else:
                    xdims.append(d + md - 1)
        kw = {} if dtype is None else {"dtype": dtype}
        if xdims is None:
            total = b(aten.sum.default, kept, **kw)
        else:
            total = b(aten.sum.dim_IntList, kept, xdims, False, **kw)
        out = total
        if fn == "mean":
            # sum / number of elements averaged: the selected positions times the other reduced dims
            extra = 1
            others = range(sel.out_dims()) if dims is None else dims
            for d in others:
                if d == k:
                    continue
                extra *= sel.shape[d] if d < k else sel.shape[d + md - 1]
            denom = count if extra == 1 else b(aten.mul.Tensor, count, extra)
            out = b(aten.div.Tensor, total, denom)
        want = _val(u)
        if tuple(_val(out).shape) != tuple(want.shape):
            out = b(aten.view.default, out, list(want.shape))
        if _val(out).dtype != want.dtype:
            raise Refused(sel.node, f"the rewrite of {u.target} would change its dtype")
        u.replace_all_uses_with(out)
        g.erase_node(u)
    _erase_dead(g, sel.node)


def _pointwise_of(u: fx.Node, sel: fx.Node) -> bool:
    """Is ``u`` an elementwise operator of ``sel`` alone (other arguments are Python numbers or
    dtypes: ``x[m].float()``, ``-x[m]``, ``x[m] * 2``, ``x[m].exp()``)?"""
    t = u.target
    if not isinstance(t, torch._ops.OpOverload) or torch.Tag.pointwise not in t.tags and t not in (
            aten._to_copy.default, aten.clone.default, aten.alias.default):
        return False
    if t is aten._to_copy.default and set(u.kwargs) - {"dtype", "layout", "device", "pin_memory", "memory_format"}:
        return False
    if sum(1 for a in u.args if a is sel) != 1 or any(v is sel for v in u.kwargs.values()):
        return False
    if any(isinstance(a, fx.Node) for a in u.args if a is not sel) or \
            any(isinstance(v, (fx.Node, list, tuple)) for v in u.kwargs.values()):
        return False
    uv, sv = _val(u), _val(sel)
    return isinstance(uv, torch.Tensor) and isinstance(sv, torch.Tensor) and len(uv.shape) == len(sv.shape)


def _replace_symint(g: fx.Graph, u: fx.Node, count: fx.Node, sel: _Selection) -> None:
    """Replace the SymInt ``u`` (numel / size of the selection) by the 0-dim int64 tensor ``count``
    in every tensor operator that takes it as a scalar operand (``loss.sum() / x[m].numel()``)."""
    for w in list(u.users):
        if w.op != "call_function" or not isinstance(w.target, torch._ops.OpOverload) \
                or w.target not in (aten.div.Tensor, aten.mul.Tensor, aten.true_divide.Tensor):
            raise Refused(sel.node, f"its size is used by {getattr(w.target, '__name__', w.target)}")
        if any(a is u for a in w.args[:1]) or any(v is u for v in w.kwargs.values()):
            raise Refused(sel.node, "its size is used as a tensor")
        b = _Builder(g, w, w, _val(count).fake_mode)
        args = [count if a is u else a for a in w.args]
        new = b(w.target, *args, **w.kwargs)
        want = _val(w)
        if _val(new).dtype != want.dtype or tuple(_val(new).shape) != tuple(want.shape):
            raise Refused(sel.node, f"rewriting its size as a tensor would change the type of {w.target}")
        w.replace_all_uses_with(new)
        g.erase_node(w)
    g.erase_node(u)


def _erase_dead(g: fx.Graph, n: fx.Node) -> None:
    """Erase ``n`` if unused, then its producers that became unused (nonzero, unbind, getitem)."""
    todo = [n]
    while todo:
        x = todo.pop()
        if x.op != "call_function" or x.users:
            continue
        ins = [a for a in x.all_input_nodes]
        if x is not n and x.target not in (aten.nonzero.default, aten.unbind.int, operator.getitem):
            continue
        g.erase_node(x)
        todo.extend(ins)


def lower_selections(gm: fx.GraphModule) -> fx.Node | None:
    """Rewrite every recognized selection of ``gm`` whose uses are reductions; return the node
    where a data-dependent shape remains (None when none does)."""
    g = gm.graph
    for n in list(g.nodes):
        if n.graph is not g or not _unbacked(_val(n)):
            continue
        sel = _selection(n)
        if sel is None:
            continue
        # equal over the reals, not bit for bit (the sums add in another order): verify(exact="bitwise")
        # refuses a program with such a rewrite
        gm.meta.setdefault("gg_selections", []).append(n.meta.get("gg_source"))
        try:
            _lower_one(gm, sel)
        except Refused as r:
            r.node.meta["gg_refused"] = r.why
            return r.node
    for n in g.nodes:
        if _unbacked(_val(n)):
            if n.op == "call_function" and _selection(n) is None and "gg_refused" not in n.meta:
                n.meta["gg_refused"] = ("only boolean-mask selections (x[mask], masked_select, "
                                        "x[mask.nonzero(as_tuple=True)]) reduced at once are accepted")
            return n
    g.lint()
    gm.recompile()
    return None
