"""Decompose the operators no lemma knows into ATen operators the lemmas do know.

The lowering gives every operator outside its vocabulary the kind "generic": such an operator is
related only by exact lookup (a rank computing the same operator on the same values), so a fused
kernel applied to a shard - ``F.scaled_dot_product_attention`` on this rank's heads, a group norm,
the backward of SDPA - stops the proof. Before lowering, `decompose` replaces each such call, on
the sequential graph and on every rank graph alike, by its definition in simpler ATen operators,
and repeats on what the definitions contain until every operator is known or has no definition.

Where the definitions come from, first match wins:

1. the user's ``Problem.decompositions`` (``{torch.ops.mylib.fused_ln.default: fn}``; ``None``
   keeps an operator opaque);
2. `BUILTIN` here: SDPA's CPU kernel without dropout or mask as the plain math form people write
   (``softmax(q @ k^T * scale [masked_fill(~tril, -inf)]) @ v``), the backward of SDPA (the gradient
   of its math form, through autograd), the efficient-attention kernels, ``all``/``any`` over dims of a bool tensor as ``amin``/``amax``;
3. PyTorch's ``torch._decomp.decomposition_table`` (refs and decompositions);
4. the operator's CompositeImplicitAutograd kernel.

How (`lower_decomposed`): the graph is lowered; each call the lowering left "generic" (and that
is not a constant computation) is re-traced on fake tensors of its arguments' shapes, dtypes,
strides and storage offsets (with ``make_fx`` and ``functionalize``, as the capture does), and the
traced operators are spliced into the fx graph in its place, with the call's source line and stack,
so findings still point at the user's line; then the graph is lowered again, until nothing changes.
An operator with a lemma (softmax, layer norm, nll_loss, embedding, matmul, reductions, elementwise
...) is never "generic", so it stays whole. A definition is used only if it ends, recursively, in
known operators (`_complete`) and every output that is read keeps its shape and dtype. Random
operators are never decomposed; a definition that draws random values brings its random operators
into the graph, where `Problem.random` applies to them as to any other (SDPA with ``dropout_p > 0``
is already captured in its math form, with its dropout). A user's definition is checked against the
operator's own kernel on random inputs where that kernel runs (`_check_user_definition`).

A definition equals the operator over the reals, not bit for bit, so `gg.verify` decomposes only in
``exact="real"`` mode. Operators from user libraries (``torch.library``) that have no definition
are an error (`CustomOpError`) naming the operator, the program and the line.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from gg_notebook.problem import ProblemError

aten = torch.ops.aten

MAX_ROUNDS = 6  # decompositions of decompositions, at most this deep


class CustomOpError(ProblemError):
    """A program calls a user-library operator that gg_notebook cannot see inside (no definition);
    names the operator, the program (``rank`` None: the sequential one) and the line."""

    def __init__(self, message: str, *, op: str, rank: int | None, source: str | None) -> None:
        super().__init__(message)
        self.op, self.rank, self.source = op, rank, source


# ---------------------------------------------------------------------------------- built-ins
def _gqa(query, key) -> bool:
    return query.size(-3) != key.size(-3)


def _sdpa_math(query, key, value, attn_mask, dropout_p, is_causal, scale):
    return aten._scaled_dot_product_attention_math.default(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=_gqa(query, key))[0]


def _sdpa_grads(grad_out, query, key, value, attn_mask, is_causal, scale):
    """d(query, key, value) of SDPA's math form, through autograd (what the fused backward computes)."""
    with torch.enable_grad():
        _, vjp = torch.func.vjp(lambda q, k, v: _sdpa_math(q, k, v, attn_mask, 0.0, is_causal, scale),
                                query, key, value)
        return vjp(grad_out)


def _flash_cpu_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """SDPA (CPU flash kernel) without dropout and without an explicit mask, in math form:
    ``softmax(masked(q @ k^T * scale)) @ v``, the causal mask a ``masked_fill`` with ``~tril(ones)``.

    PyTorch's own math form scales q and k by ``sqrt(scale)`` each and uses ``_safe_softmax`` (rows
    that are entirely -inf give 0 instead of NaN). Without ``attn_mask`` no row is entirely masked
    (the causal mask keeps column 0 of every row), so over finite scores ``_safe_softmax`` is
    ``softmax`` and the two forms are equal over the reals; this one is what people write, so the
    spec and rank spellings meet without a lemma for ``_safe_softmax``. With dropout, a mask, GQA
    (fewer key heads) or an empty key sequence it declines (PyTorch's definition is used)."""
    def pytorch():
        from torch._decomp import decomposition_table

        fn = decomposition_table.get(aten._scaled_dot_product_flash_attention_for_cpu.default)
        if fn is None:
            return NotImplemented
        return fn(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)

    if dropout_p != 0.0 or attn_mask is not None:
        return pytorch()
    if query.dim() < 2 or key.dim() != query.dim() or value.dim() != query.dim():
        return pytorch()
    if query.shape[:-2] != key.shape[:-2] or key.shape[:-1] != value.shape[:-1]:
        return pytorch()  # GQA (enable_gqa) or broadcast batch dims: not this definition
    L, S = query.size(-2), key.size(-2)
    if S == 0 or not query.dtype.is_floating_point:
        return pytorch()
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    attn = torch.matmul(query, key.transpose(-2, -1)) * factor
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        attn = attn.masked_fill(keep.logical_not(), float("-inf"))
    out = torch.matmul(torch.softmax(attn, dim=-1), value)
    return out, torch.logsumexp(attn, dim=-1)


def _flash_cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                        scale=None):
    if dropout_p != 0.0:
        return NotImplemented  # the mask the forward drew is not an argument: cannot be recomputed
    return _sdpa_grads(grad_out, query, key, value, attn_mask, is_causal, scale)


def _efficient_forward(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *,
                       scale=None):
    if dropout_p != 0.0:
        return NotImplemented  # its dropout mask comes from philox state, which the math form does not draw
    out = _sdpa_math(query, key, value, attn_bias, 0.0, is_causal, scale)
    # only the output is defined here; the other outputs feed the fused backward, decomposed below
    # (an output that is read elsewhere has another shape, so the definition is declined)
    empty = query.new_zeros(())
    return out, query.new_zeros((0,)), empty, empty


def _efficient_backward(grad_out, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset,
                        dropout_p, grad_input_mask, is_causal=False, *, scale=None):
    if dropout_p != 0.0:
        return NotImplemented
    if grad_input_mask[3]:
        return NotImplemented  # the bias gradient: not defined here
    dq, dk, dv = _sdpa_grads(grad_out, query, key, value, attn_bias, is_causal, scale)
    return dq, dk, dv, None


def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    """(var, mean) as sums: mean = sum(x)/n, var = sum((x - mean)^2) / (n - correction)."""
    if not x.dtype.is_floating_point:
        return NotImplemented
    dims = tuple(range(x.dim())) if dim is None or len(dim) == 0 else tuple(d % max(x.dim(), 1) for d in dim)
    n = math.prod(x.shape[d] for d in dims)
    c = 1 if correction is None else correction
    mean = torch.mean(x, dims, keepdim=True)
    var = torch.sum((x - mean) ** 2, dims, keepdim=keepdim) / (n - c)
    return var, (mean if keepdim else torch.mean(x, dims, keepdim=False))


def _var(x, dim=None, *, correction=None, keepdim=False):
    out = _var_mean(x, dim, correction=correction, keepdim=keepdim)
    return out if out is NotImplemented else out[0]


def _std(x, dim=None, *, correction=None, keepdim=False):
    out = _var_mean(x, dim, correction=correction, keepdim=keepdim)
    return out if out is NotImplemented else torch.sqrt(out[0])


def _as_strided(x, size, stride, storage_offset=None):
    """as_strided that only reads a contiguous tensor in order from its start: a reshape."""
    size, stride = tuple(size), tuple(stride)
    if not x.is_contiguous() or x.storage_offset() != 0 or (storage_offset or 0) != 0:
        return NotImplemented
    contiguous, step = [], 1
    for n in reversed(size):
        contiguous.insert(0, step)
        step *= max(int(n), 1)
    if math.prod(size) != x.numel() or any(n != 1 and st != c for n, st, c in zip(size, stride, contiguous)):
        return NotImplemented
    return x.reshape(size)


def _all_dim(x, dim, keepdim=False):
    if x.dtype != torch.bool:
        return NotImplemented
    return torch.amin(x, dim, keepdim)


def _any_dim(x, dim, keepdim=False):
    if x.dtype != torch.bool:
        return NotImplemented
    return torch.amax(x, dim, keepdim)


def _all_dims(x, dim=None, keepdim=False):
    if x.dtype != torch.bool:
        return NotImplemented
    return torch.amin(x, tuple(range(x.dim())) if dim is None else dim, keepdim)


def _any_dims(x, dim=None, keepdim=False):
    if x.dtype != torch.bool:
        return NotImplemented
    return torch.amax(x, tuple(range(x.dim())) if dim is None else dim, keepdim)


def _safe_softmax(x, dim, dtype=None):
    """softmax, with rows that are entirely -inf giving zeros instead of NaN (PyTorch's definition
    writes ``where(rows, zeros_like(out), out)``; a broadcast masked_fill keeps no full-size constant)."""
    out = torch.softmax(x, dim, dtype=dtype)
    return out.masked_fill(torch.all(x.eq(float("-inf")), dim, keepdim=True), 0.0)


def _roll(x, shifts, dims=()):
    """``torch.roll`` as data movement: along each dim, the last ``k`` elements then the first
    ``n - k`` (``k = shift mod n``); with no dims, the flattened tensor rolled and viewed back."""
    shifts = list(shifts) if isinstance(shifts, (list, tuple)) else [shifts]
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not dims:
        if len(shifts) != 1:
            return NotImplemented
        return _roll(x.reshape(-1), shifts, [0]).view(x.shape)
    if len(shifts) != len(dims):
        return NotImplemented
    out = x
    for s, d in zip(shifts, dims):
        n = out.shape[d]
        if n == 0:
            continue
        k = int(s) % n
        if k:
            out = torch.cat((out.narrow(d, n - k, k), out.narrow(d, 0, n - k)), d)
    return out if out is not x else x.clone()


def _addc(op):
    def definition(self, tensor1, tensor2, *, value=1):
        ts = (self, tensor1, tensor2)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or any(t.dtype != self.dtype for t in ts) or not self.dtype.is_floating_point):
            return NotImplemented
        p = op(tensor1, tensor2)
        if value != 1:
            p = p * value
        return self + p
    return definition


# Fused elementwise arithmetic that programs equally write unfused (``torch.addcmul(x * cos, rot,
# sin)`` for ``x * cos + rot * sin``): replaced by its definition in ``exact="real"`` mode even
# though it has a lemma (it is elementwise), so both spellings meet (`lower_decomposed`).
# ``addcmul(a, b, c, value=v) = a + (b * c) * v``; ``addcdiv`` with ``/``. Same-dtype floating
# operands and a Python-number ``value`` only (else kept whole).
UNFUSE: dict = {
    aten.addcmul.default: _addc(torch.mul),
    aten.addcdiv.default: _addc(torch.div),
}


def _select_scatter(x, src, dim, index):
    """``x`` with ``src`` written at ``index`` along ``dim``: the slices before and after it around ``src`` (PyTorch's
    definition is a ``where`` against an ``iota == index`` mask, which hides that only one slice
    is written; the gradient of ``w[s]`` in a stacked-weights model is this into zeros)."""
    i = index % x.shape[dim]
    return torch.cat([x.narrow(dim, 0, i), src.unsqueeze(dim), x.narrow(dim, i + 1, x.shape[dim] - i - 1)], dim)


def _select_backward(grad, input_sizes, dim, index):
    return _select_scatter(grad.new_zeros(input_sizes), grad, dim, index)


BUILTIN: dict = {
    aten.select_scatter.default: _select_scatter,
    aten.select_backward.default: _select_backward,
    aten.roll.default: _roll,
    aten._safe_softmax.default: _safe_softmax,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _flash_cpu_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _flash_cpu_backward,
    aten._scaled_dot_product_efficient_attention.default: _efficient_forward,
    aten._scaled_dot_product_efficient_attention_backward.default: _efficient_backward,
    # a bool tensor is all True iff its minimum is True (and any iff its maximum): reductions the
    # reduce lemmas split over shards, where all/any have no lemma
    aten.var_mean.correction: _var_mean,
    aten.var.correction: _var,
    aten.std.correction: _std,
    aten.as_strided.default: _as_strided,
    aten.all.dim: _all_dim,
    aten.any.dim: _any_dim,
    aten.all.dims: _all_dims,
    aten.any.dims: _any_dims,
}


def _with_foreach(table: dict) -> dict:
    """The multi-tensor ``_foreach_*`` operators: each tensor's operator (`gg_notebook.ir.foreach`)."""
    from gg_notebook.ir.foreach import BUILTIN as FOREACH

    return {**FOREACH, **table}


BUILTIN = _with_foreach(BUILTIN)


# ---------------------------------------------------------------------------------- lookup
def _is_builtin_namespace(target) -> bool:
    ns = getattr(target, "namespace", None)
    return ns in ("aten", "prim", "prims") or ns is None


def _user_entry(target, user: dict):
    """(found, fn) from the user's table: keyed by the OpOverload or its packet."""
    if target in user:
        return True, user[target]
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in user:
        return True, user[packet]
    return False, None


def definition_of(target, user: dict) -> Callable | None:
    """The function that defines ``target`` (see the module docstring), or None."""
    found, fn = _user_entry(target, user)
    if found:
        return fn
    if target in BUILTIN:
        return BUILTIN[target]
    from torch._decomp import decomposition_table

    fn = decomposition_table.get(target)
    if fn is not None:
        return fn
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd"):
            return target.decompose
    except Exception:  # noqa: BLE001 - not a dispatcher op
        pass
    return None


# ---------------------------------------------------------------------------------- tracing
_NEVER = None  # filled lazily: packets the lowering treats as random or constant


# Scans stay whole: PyTorch defines them with an n x n triangular mask (quadratic memory in the
# simulator), which gives the lemmas nothing simpler to split - a scan is for a lemma of its own.
KEEP = {"cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "_cummax_helper", "_cummin_helper"}


def _never() -> set:
    global _NEVER
    if _NEVER is None:
        from gg_notebook.ir import lower as L

        _NEVER = set(L.RANDOM) | set(L.FACTORIES) | KEEP
    return _NEVER


def _packet(target) -> str:
    try:
        return target.overloadpacket.__name__
    except AttributeError:
        return getattr(target, "__name__", str(target))


def _meta_key(v):
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), tuple(v.stride()), v.storage_offset(), v.dtype, str(v.device))
    return None


def _static_key(a):
    """A hashable key for a non-tensor argument (types kept: 1, 1.0 and True differ)."""
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_static_key(x) for x in a))
    if isinstance(a, fx.Node):
        return ("node",)
    try:
        hash(a)
        return (type(a).__name__, a)
    except TypeError:
        return (type(a).__name__, repr(a))


class _Traced:
    """A traced definition: an fx graph whose placeholders are the call's tensor arguments, in
    the order of ``pytree.tree_flatten((args, kwargs))``."""

    def __init__(self, gm: fx.GraphModule, n_tensors: int):
        self.gm, self.n_tensors = gm, n_tensors
        self.complete: dict = {}  # frozenset of the user's operators -> `_complete`'s answer


_CACHE: dict = {}


def _trace_definition(fn: Callable, node: fx.Node, cache: bool = True) -> _Traced | None:
    """``fn`` applied to ``node``'s arguments, traced on fake tensors; None if ``fn`` declines
    (returns NotImplemented) or fails on them. Traces of PyTorch's and the built-in definitions
    are cached by the arguments' metadata (``cache``; not the user's: their lifetime is a problem's)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    positions = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)]
    vals = [flat[i].meta.get("val") for i in positions]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return None  # a symbolic or non-tensor node argument: leave the call alone
    key = (node.target, fn, tuple(_meta_key(v) for v in vals),
           tuple(_static_key(a) for i, a in enumerate(flat) if i not in positions), len(flat))
    if cache and key in _CACHE:
        return _CACHE[key]

    def run(*tensors):
        full = list(flat)
        for i, t in zip(positions, tensors):
            full[i] = t
        args, kwargs = pytree.tree_unflatten(full, spec)
        out = fn(*args, **kwargs)
        if out is NotImplemented:
            raise _Declined()
        if isinstance(out, (tuple, list)):  # a torch.return_types namedtuple -> a plain tuple
            return tuple(out)
        return out

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    try:
        with mode:
            fakes = [_like(v) for v in vals]
        with torch.no_grad():
            gm = make_fx(torch.func.functionalize(run), tracing_mode="fake", record_stack_traces=False)(*fakes)
        gm.graph.eliminate_dead_code()  # what the definition computed and did not return
        traced = _Traced(gm, len(fakes))
    except _Declined:
        traced = None
    except Exception:  # noqa: BLE001 - a definition that does not apply to these arguments
        traced = None
    if cache:
        _CACHE[key] = traced
    return traced


def _like(v: torch.Tensor) -> torch.Tensor:
    """A tensor (in the current fake mode) with ``v``'s shape, strides, storage offset and dtype."""
    return _like_meta(tuple(v.shape), tuple(v.stride()), v.storage_offset(), v.dtype, v.device)


def _like_meta(shape: tuple, stride: tuple, offset: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor (in the current fake mode) with this shape, strides, storage offset and dtype."""
    if offset == 0:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    extent = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    return torch.empty(offset + extent, dtype=dtype, device=device).as_strided(shape, stride, offset)


class _Declined(Exception):
    pass


# ---------------------------------------------------------------------------------- splicing
def _used_outputs(node: fx.Node):
    """{output index: getitem node} for a tuple-valued call (dead getitems left out), or None
    if the call's value is a tensor."""
    val = node.meta.get("val")
    if not isinstance(val, (tuple, list)):
        return None
    out = {}
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and u.users:
            out.setdefault(u.args[1], []).append(u)
    return out


def _same_meta(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and tuple(a.shape) == tuple(b.shape)
            and a.dtype == b.dtype)


def _splice(gm: fx.GraphModule, node: fx.Node, traced: _Traced) -> bool:
    """Replace ``node`` by the traced definition; False (nothing changed) if an output that is read
    would change its shape or dtype."""
    sub = traced.gm
    flat, _ = pytree.tree_flatten((node.args, node.kwargs))
    tensor_args = [a for a in flat if isinstance(a, fx.Node)]
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in sub.graph.nodes if n.op == "output")
    results = out_node.args[0]
    val = node.meta.get("val")
    used = _used_outputs(node)

    def sub_val(r):
        if isinstance(r, fx.Node):
            return r.meta.get("val")
        return None

    if used is None:
        if isinstance(results, (tuple, list)):
            if len(results) != 1:
                return False
            results = results[0]
        if not _same_meta(sub_val(results), val):
            return False
    else:
        if not isinstance(results, (tuple, list)):
            return False
        for k in used:
            if not (0 <= k < len(results)) or not _same_meta(sub_val(results[k]), val[k]):
                return False

    env: dict = dict(zip(placeholders, tensor_args))
    graph = gm.graph
    chain = tuple(node.meta.get("gg_decomposed_chain", ())) + (node.target,)
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr":
                attr = getattr(sub, n.target)
                name = f"_gg_decomp_const{len([k for k in dir(gm) if k.startswith('_gg_decomp_const')])}"
                setattr(gm, name, attr)
                new = graph.get_attr(name)
            elif n.op == "call_function":
                args = fx.map_arg(n.args, lambda a: env[a])
                kwargs = fx.map_arg(n.kwargs, lambda a: env[a])
                new = graph.create_node("call_function", n.target, args, kwargs, name=f"{node.name}_{n.name}")
            else:  # pragma: no cover - make_fx emits no modules or methods
                return False
            new.meta = dict(n.meta)
            new.meta["gg_source"] = node.meta.get("gg_source")
            new.meta["gg_frames"] = node.meta.get("gg_frames") or []
            new.meta["gg_decomposed_chain"] = chain
            env[n] = new

    def mapped(r):
        return env[r] if isinstance(r, fx.Node) else r

    if used is None:
        node.replace_all_uses_with(mapped(results))
    else:
        for u in list(node.users):
            k = u.args[1] if u.target is operator.getitem else None
            if k in used:
                u.replace_all_uses_with(mapped(results[k]))
            graph.erase_node(u)
    graph.erase_node(node)
    return True


# ---------------------------------------------------------------------------------- the pass
def _ground(n, memo: dict) -> bool:
    """``n`` depends on no input, collective or random value (a constant the engine computes)."""
    if n.name in memo:
        return memo[n.name]
    if n.op == "const":
        out = True
    elif n.op in ("input", "collective"):
        out = False
    elif n.op == "call" and n.attrs.unique is not None:
        out = False
    else:
        out = all(_ground(i, memo) for i in n.inputs)
    memo[n.name] = out
    return out


def _stuck_calls(graph) -> list:
    """The graph's calls of kind "generic" that are not constant computations."""
    memo: dict = {}
    return [n for n in graph.nodes if n.op == "call" and n.attrs.kind == "generic" and not _ground(n, memo)]


def _definition_traced(node: fx.Node, user: dict) -> _Traced | None:
    """``node``'s definition traced on its arguments, if it has one and it applies."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or _packet(target) in _never():
        return None
    if node.meta.get("gg_collective") is not None or target in node.meta.get("gg_decomposed_chain", ()):
        return None
    fn = definition_of(target, user)
    if fn is None:
        return None
    return _trace_definition(fn, node, cache=not _user_entry(target, user)[0])


def _complete(traced: _Traced, user: dict, depth: int) -> bool:
    """The definition ends, recursively, in operators the lowering knows (or constants and random
    values): only then is it used. (PyTorch's definition of a partial ``slice_scatter`` is an
    ``_unsafe_masked_index``, no better known than the original: that one stays whole.)"""
    from gg_notebook.ir.lower import _Lowerer

    key = frozenset(user)
    if key in traced.complete:
        return traced.complete[key]
    traced.complete[key] = False  # cut cycles
    ok = True
    graph = _Lowerer(traced.gm, None, None).run()
    by_name = {n.name: n for n in traced.gm.graph.nodes}
    for n in _stuck_calls(graph):
        node = by_name.get(n.fx_name)
        if node is None or node.op != "call_function":
            ok = False
            break
        if isinstance(node.target, torch._ops.OpOverload) and _packet(node.target) in _never():
            continue
        sub = _definition_traced(node, user) if depth > 0 else None
        if sub is None or not _complete(sub, user, depth - 1):
            ok = False
            break
    traced.complete[key] = ok
    return ok


_TOL = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3),
        torch.bfloat16: (2e-2, 1e-2)}
MAX_CHECK_ELEMENTS = 1 << 20


def _check_user_definition(node: fx.Node, fn: Callable, rank) -> None:
    """A user's definition against the operator's own kernel, on random inputs of the call's
    shapes (floating-point arguments on the CPU, up to `MAX_CHECK_ELEMENTS`; otherwise, or if the
    kernel does not run here, it is trusted as given). `CustomOpError` if they disagree."""
    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in flat]
    tensors = [v for v in vals if v is not None]
    if any(not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point or v.device.type != "cpu"
           for v in tensors) or sum(v.numel() for v in tensors) > MAX_CHECK_ELEMENTS:
        return
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(tuple(v.shape), generator=g, dtype=torch.float64).to(v.dtype) if v is not None else a
            for a, v in zip(flat, vals)]
    args, kwargs = pytree.tree_unflatten(full, spec)
    try:
        with torch.no_grad():
            want = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - no kernel for this device or these inputs: nothing to compare
        return
    with torch.no_grad():
        got = fn(*args, **kwargs)
    want_l = list(want) if isinstance(want, (tuple, list)) else [want]
    got_l = list(got) if isinstance(got, (tuple, list)) else [got]
    for k, (w, o) in enumerate(zip(want_l, got_l)):
        if not isinstance(w, torch.Tensor) or not isinstance(o, torch.Tensor) or w.shape != o.shape:
            continue  # shapes are checked where the definition is spliced
        rtol, atol = _TOL.get(w.dtype, (0.0, 0.0))
        if not torch.allclose(o.to(w.dtype), w, rtol=rtol, atol=atol, equal_nan=True):
            err = (o.double() - w.double()).abs().nan_to_num(float("inf")).max().item()
            _, at = _where(node)
            prog = "the sequential program" if rank is None else f"rank {rank}'s program"
            raise CustomOpError(
                f"the definition given for {node.target} in Problem.decompositions disagrees with the operator's own "
                f"kernel (output {k}, max error {err:.3g} on random inputs of the shapes of its call in {prog}{at}): "
                f"fix the definition; the proof would be about the definition, not the operator.",
                op=str(node.target), rank=rank, source=node.meta.get("gg_source"))


def _where(node: fx.Node) -> tuple[str | None, str]:
    source = node.meta.get("gg_source")
    frames = node.meta.get("gg_frames") or ()
    code = frames[-1][3] if frames and len(frames[-1]) > 3 else None
    at = f" at {source}" if source else ""
    at += f" (`{code.strip()}`)" if code else ""
    return source, at


def decompose_step(gm: fx.GraphModule, graph, user: dict, rank=None) -> bool:
    """One round: replace, in ``gm``, the calls that ``graph`` (``gm`` lowered) left "generic" by
    their definitions. True if anything changed."""
    names = {n.fx_name for n in _stuck_calls(graph)}
    if not names:
        return False
    nodes = [n for n in gm.graph.nodes if n.name in names and n.op == "call_function"]
    done: dict = gm.meta.setdefault("gg_decomposed", {})  # str(op) -> number of calls replaced
    changed = False
    for node in reversed(nodes):  # users first: a backward's definition frees its forward's extras
        target = node.target
        traced = _definition_traced(node, user)
        if traced is None:
            continue
        found, fn = _user_entry(target, user)
        if not found and not _complete(traced, user, MAX_ROUNDS):
            continue  # (a user's definition is used as given: the op has nothing better)
        if found:
            _check_user_definition(node, fn, rank)
        if _splice(gm, node, traced):
            done[str(target)] = done.get(str(target), 0) + 1
            changed = True
    return changed


def _unfuse(gm: fx.GraphModule) -> None:
    """Replace every `UNFUSE` call of ``gm`` by its definition (where it applies)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in UNFUSE]
    if not nodes:
        return
    done: dict = gm.meta.setdefault("gg_decomposed", {})
    for node in nodes:
        traced = _trace_definition(UNFUSE[node.target], node)
        if traced is not None and _splice(gm, node, traced):
            done[str(node.target)] = done.get(str(node.target), 0) + 1


def lower_decomposed(gm: fx.GraphModule, rank: int | None, user: dict | None, lower: Callable):
    """``lower()`` (which lowers ``gm``) after replacing, in place and recursively, every call it
    leaves "generic" by its definition. Raises `CustomOpError` for a user-library operator left
    without a definition (unless ``user`` maps it to None)."""
    user = dict(user or {})
    _unfuse(gm)
    graph = lower()
    for _ in range(MAX_ROUNDS):
        if not decompose_step(gm, graph, user, rank):
            break
        graph = lower()
    graph.decomposed = dict(gm.meta.get("gg_decomposed", {}))
    _refuse_opaque_custom_ops(graph, rank, user)
    return graph


def _refuse_opaque_custom_ops(graph, rank, user: dict) -> None:
    for n in graph.nodes:
        if n.op != "call" or n.attrs.kind != "generic":
            continue
        target = n.attrs.target
        if not isinstance(target, torch._ops.OpOverload) or _is_builtin_namespace(target):
            continue
        found, fn = _user_entry(target, user)
        if found and fn is None:
            continue  # kept opaque on purpose
        if target.namespace in ("_c10d_functional", "c10d", "_dtensor", "profiler"):
            continue
        at = f" at {n.source}" if n.source else ""
        at += f" (`{n.code.strip()}`)" if n.code else ""
        prog = "the sequential program" if rank is None else f"rank {rank}'s program"
        why = ("its definition did not apply to these arguments (it failed, returned NotImplemented, or changed "
               "an output's shape or dtype)" if found or definition_of(target, {}) is not None
               else "it has no decomposition and no CompositeImplicitAutograd kernel")
        qual = f"torch.ops.{target.namespace}.{_packet(target)}.{target._overloadname}"
        raise CustomOpError(
            f"{prog} calls the custom operator {target}{at}, which gg_notebook cannot see inside: {why}. "
            f"Give its definition in plain PyTorch: gg.Problem(..., decompositions={{{qual}: fn}}) where "
            f"fn takes the operator's arguments and returns its outputs (same shapes and dtypes); "
            f"or map it to None to keep it opaque (then it is related only where both programs call it on the "
            f"same values).", op=str(target), rank=rank, source=n.source)


__all__ = ["BUILTIN", "CustomOpError", "definition_of", "lower_decomposed"]
