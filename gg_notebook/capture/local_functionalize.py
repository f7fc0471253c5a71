"""Functionalize a traced graph's in-place operators on fresh tensors without replaying the graph.

`tracing._trace` traces a program with make_fx (pass 1) and, if the graph mutates anything, replays
it under ``torch.func.functionalize`` (pass 2): a second trace of the whole program, ~40% of a
rank's trace. Most mutations of the programs users write are local: a collective writing into a
buffer it was given (``all_gather_into_tensor(out, x)``, ``all_reduce(t)``: rewritten to
``copy_(out, collective_result(x))`` by `collectives.rewrite_collectives`), a masked assignment
into a clone (``t = x.clone(); t[mask] = 0``), ``grad_2d[i, j] -= u`` on a reshaped clone. For
those, `functionalize_locally` rewrites the pass-1 graph in place into the graph functionalization
would give, and the replay is skipped.

What it rewrites, and what it refuses (then the graph is left untouched and replayed):

- Every mutating node must be an ``aten`` in-place operator ``op_(self, ...) -> self`` that writes
  only ``self`` and has a functional twin ``op`` with the same arguments (``copy_`` -> ``copy``,
  ``index_put_`` -> ``index_put``, ``sub_.Tensor`` -> ``sub.Tensor``); operators that change
  metadata (``inplace_view``: ``transpose_``, ``as_strided_``; ``resize_``, ``set_``) are refused,
  and so is a twin whose result (computed on the fake values) has another shape or dtype than
  ``self`` (an in-place op keeps ``self``'s dtype; the functional one may promote).
- The mutated tensor's storage (its *root*) must be fresh: made by an operator whose schema returns
  no alias (or an element of such an operator's result list, or a `collective_result`); not an
  input, not a constant. Every alias of the root must be a full reshape of it: the root, chains of
  ``aten.view.default`` of it, and the in-place nodes on them. Any other alias (a slice, a
  transpose, a split, ``detach``, an operator gg_notebook does not know) anywhere in such a class
  refuses the rewrite, as does any non-aten or unknown node reading a class member.

The rewrite walks the graph in order: ``m = op_(t, *args)`` becomes ``new = op(t', *args')``
(primes: the current values), the root's current value becomes ``new`` (``t`` is the root) or
``view(new, root.shape)`` (emitted right after, as functionalization's commit of the update to the
base); a later reader of any alias ``a`` of the root (``t`` itself, the in-place node, a view
made before the write) reads ``view(root', a.shape)`` instead, emitted before its first reader,
once per alias and version. Since every alias is a full reshape (element order is row-major order
through any chain of views), that is the value the eager program reads. New nodes carry the
in-place node's source metadata, as functionalization's replay gives them.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

_VIEW = torch.ops.aten.view.default
# aliases of their whole argument, element for element in row-major order (reshapes, same-shape aliases);
# ``_unsafe_view``'s schema says it returns a fresh tensor, but it shares its argument's storage (and
# functionalization treats it as a view), so a write through it must reach its base
_FULL_ALIAS = (_VIEW, torch.ops.aten._unsafe_view.default, torch.ops.aten.detach.default,
               torch.ops.aten.alias.default)
_REFUSED_NAMES = {"resize_", "resize_as_", "set_", "as_strided_", "swap_"}
_DROP_META = ("val", "tensor_meta", "example_value")


def _schema(t):
    return getattr(t, "_schema", None) if isinstance(t, torch._ops.OpOverload) else None


def _returns_alias(t) -> bool:
    s = _schema(t)
    return s is None or any(r.alias_info is not None for r in s.returns)


def _is_fresh(n: fx.Node) -> bool:
    """Whether ``n``'s value owns its storage (per the operator schemas, as functionalization trusts)."""
    from gg_notebook.capture.collectives import collective_result

    if n.op != "call_function":
        return False
    t = n.target
    if t is collective_result:
        return True
    if t is operator.getitem:
        src = n.args[0]
        return isinstance(src, fx.Node) and src.op == "call_function" and _schema(src.target) is not None \
            and not _returns_alias(src.target) and not _schema(src.target).is_mutable
    s = _schema(t)
    return s is not None and not s.is_mutable and not _returns_alias(t) and t not in _FULL_ALIAS


def _functional_twin(t):
    """The functional operator of in-place aten operator ``t`` (writes only ``self``, returns it),
    or None if ``t`` is not such an operator or has no twin with the same arguments."""
    s = _schema(t)
    if s is None or t.namespace != "aten" or torch.Tag.inplace_view in t.tags:
        return None
    base = s.name.split("::")[-1]
    if not base.endswith("_") or base.startswith("_") and base.endswith("__") or base in _REFUSED_NAMES:
        return None
    args = s.arguments
    if not args or args[0].alias_info is None or not args[0].alias_info.is_write:
        return None
    if any(a.alias_info is not None for a in args[1:]):
        return None
    if len(s.returns) != 1 or s.returns[0].alias_info is None \
            or s.returns[0].alias_info.before_set != args[0].alias_info.before_set:
        return None
    packet = getattr(torch.ops.aten, base[:-1], None)
    if packet is None:
        return None
    f = getattr(packet, t._overloadname, None)
    fs = _schema(f)
    if fs is None or fs.is_mutable or _returns_alias(f) or len(fs.returns) != 1:
        return None
    if [(a.name, str(a.type)) for a in fs.arguments] != [(a.name, str(a.type)) for a in args]:
        return None
    return f


def _val(n: Any):
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _fake_run(f, args, kwargs):
    from torch._guards import detect_fake_mode

    vals = torch.fx.node.map_aggregate((args, kwargs), _val)
    mode = detect_fake_mode(torch.utils._pytree.tree_leaves(vals))
    if mode is None:
        return None
    with mode, torch.no_grad():
        return f(*vals[0], **vals[1])


def functionalize_locally(gm: fx.GraphModule) -> bool:
    """Rewrite ``gm``'s mutations as functionalization would (module docstring); True if ``gm`` now
    has none. False: ``gm`` is left exactly as it was (some mutation is outside what this handles)."""
    g = gm.graph
    muts = [n for n in g.nodes if n.op == "call_function" and _schema(n.target) is not None
            and _schema(n.target).is_mutable]
    if not muts:
        return _no(1)
    # ---- plan (no change to the graph): roots, classes, functional twins and their values
    root: dict[fx.Node, fx.Node] = {}
    twins: dict[fx.Node, tuple] = {}
    mset = set(muts)

    def root_of(x) -> fx.Node | None:
        seen = []
        while isinstance(x, fx.Node):
            if x in root:
                r = root[x]
                break
            seen.append(x)
            if x in mset or (x.op == "call_function" and x.target in _FULL_ALIAS):
                x = x.args[0]
                continue
            r = x if _is_fresh(x) else None
            break
        else:
            r = None
        for s in seen:
            root[s] = r
        return r

    classes: set[fx.Node] = set()
    for m in muts:
        f = _functional_twin(m.target)
        t = m.args[0] if m.args else None
        if f is None or not isinstance(t, fx.Node):
            return _no(2)
        r = root_of(t)
        if r is None:
            return _no(3)
        tv = _val(t)
        try:
            out = _fake_run(f, m.args, m.kwargs)
        except Exception:  # noqa: BLE001 - the twin does not take these arguments: replay instead
            return _no(4)
        if not isinstance(out, torch.Tensor) or not isinstance(tv, torch.Tensor) \
                or tuple(out.shape) != tuple(tv.shape) or out.dtype != tv.dtype or not out.is_contiguous():
            return _no(5)  # (contiguous: every alias of the class is then a `view` of the new value)
        twins[m] = (f, out)
        classes.add(r)
    members = [n for n in g.nodes if n.op == "call_function" and root_of(n) in classes]
    from gg_notebook.capture.collectives import collective_result

    pos = {n: i for i, n in enumerate(g.nodes)}
    last_write: dict[fx.Node, int] = {}
    for m in muts:
        last_write[root[m]] = pos[m]
    for n in members:
        for u in n.users:
            if u.op == "output":
                continue
            if u.op != "call_function":
                return _no(6)
            if u in mset or u.target in _FULL_ALIAS:
                continue  # a member itself (a write, a reshape of the class), or reads ``n``
            if u.target is collective_result:
                continue
            s = _schema(u.target)
            if s is None or s.is_mutable:
                return _no(7)
            if _returns_alias(u.target) and pos[u] < last_write[root[n]]:
                return _no(8)  # another alias, alive while the class is written
    if any(not isinstance(_val(n), torch.Tensor) for n in members):
        return _no(9)
    # ---- rewrite, in graph order
    version = {r: 0 for r in classes}
    current = {r: r for r in classes}
    defined: dict[fx.Node, int] = {}  # class member -> version of its root when it was defined
    regen: dict[tuple, fx.Node] = {}
    shape = {n: list(_val(n).shape) for n in members}
    m_alias: dict[fx.Node, fx.Node] = {}  # in-place node -> the alias it writes (its self)
    writer: dict[fx.Node, fx.Node] = {}  # root -> its latest in-place node
    erase = []

    def meta_from(src: fx.Node, dst: fx.Node, val) -> None:
        dst.meta.update({k: v for k, v in src.meta.items() if k not in _DROP_META})
        dst.meta["val"] = val

    def read(x, before: fx.Node):
        if not isinstance(x, fx.Node) or x not in defined:
            return x
        r = root[x]
        if defined[x] == version[r]:
            return x
        alias = m_alias.get(x, x)
        if alias is r or shape[alias] == shape[r]:  # the same elements in the same shape
            return current[r]
        key = (alias, version[r])
        got = regen.get(key)
        if got is None:
            base = current[r]
            with g.inserting_before(before):
                got = g.call_function(_VIEW, (base, shape[alias]))
            meta_from(before, got, _VIEW(_val(base), shape[alias]))
            regen[key] = got
        return got

    for n in list(g.nodes):
        if n.op in ("placeholder", "get_attr"):
            continue
        new_args = fx.node.map_arg(n.args, lambda a: read(a, n))
        new_kwargs = fx.node.map_arg(n.kwargs, lambda a: read(a, n))
        if n in mset:
            t = n.args[0]
            m_alias[n] = m_alias.get(t, t)
            r = root[n]
            f, out = twins[n]
            with g.inserting_before(n):
                new = g.call_function(f, tuple(new_args), dict(new_kwargs))
            meta_from(n, new, out)
            version[r] += 1
            writer[r] = n
            if m_alias[n] is r or shape[m_alias[n]] == shape[r]:
                current[r] = new
            else:  # the write reaches the root: functionalization's commit of the update to the base
                with g.inserting_before(n):
                    base = g.call_function(_VIEW, (new, shape[r]))
                meta_from(n, base, _VIEW(out, shape[r]))
                current[r] = base
            defined[n] = -1  # an in-place node is never read as itself
            erase.append(n)
            continue
        if new_args != n.args or new_kwargs != n.kwargs:
            n.args, n.kwargs = tuple(new_args), dict(new_kwargs)
        if root.get(n) in classes:
            defined[n] = version[root[n]]
    for n in reversed(erase):
        if n.users:  # every reader was redirected above
            raise AssertionError(f"functionalize_locally: {n} still has readers")
        g.erase_node(n)
    return True


last_refusal: int | None = None  # which check refused the last graph (for debugging)


def _no(where: int) -> bool:
    global last_refusal
    last_refusal = where
    return False
