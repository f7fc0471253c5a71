"""Trace a program without make_fx: a dispatch mode writes every operator call into an fx graph.

make_fx's first pass (`tracing._trace`) runs the program under a proxy mode over a fake mode: every
operator call reaching the dispatcher becomes a graph node whose arguments are the nodes of the
tensors it reads. Its proxies (pytree walks, proxy objects, metadata per call) cost more than the
fake-tensor execution itself, and a 405B-shaped rank makes tens of thousands of calls. `DirectTracer`
writes the same graph from the same calls, finding each argument's node in a dictionary (tensor id ->
weak reference and node: a strong reference would make autograd detach every factory result):

- a call becomes ``call_function`` with the operator overload as target, named as make_fx names it;
  a tensor argument is the node of its latest value (an in-place call's result is the call's node,
  so later readers read the write, as in make_fx); a real (non-fake) tensor is a ``_tensor_constant``
  attribute and a script object (process group, reduce op) a ``_torchbind_obj`` one, read by a
  ``get_attr`` per use; a script object an earlier call returned (a collective's work handle) is
  that call's node;
- a call returning a list or tuple gets a ``getitem`` node per element, eagerly;
- ``meta["val"]`` is make_fx's own snapshot (`extract_val`; ``meta["tensor_meta"]``, which says the
  same, only on placeholders); ``meta["eager_input_vals"]`` where make_fx keeps them;
- ``lift_fresh`` (``torch.tensor(...)``) is written as ``lift_fresh_copy``;
- an operator whose CompositeImplicitAutograd kernel autograd would have used is decomposed by that
  kernel, its calls traced; ``bool(t)`` is ``(t != 0).item()``;
- make_fx's constant propagation: a small ``torch.tensor(...)`` and what is computed from such values
  alone are known by value, and a data-dependent call on known values (``.item()``) runs for real,
  leaving no node. Collectives are never evaluated so, and their results are never known by value
  (make_fx would run them for real: under the fake process group they communicate nothing, and the
  local value would be baked in);
- the program sees what it sees under make_fx (`_like_make_fx`): a torch-function mode, ``torch.fx``
  tracing, and work torch keeps out of make_fx's graph with ``disable_proxy_modes_tracing`` (DTensor's
  sharding propagation, DeviceMesh slicing) is kept out of this one; ``t.data = other`` is followed
  (`data_assignment`).

Where make_fx would do something this tracer does not reproduce, it refuses rather than guesses:
selective activation checkpointing (it asks whether make_fx traces), a symbolic size or result, a fake
tensor no traced call produced, an argument of a type it does not know, a call returning a dict, an
operator that is not an overload (a higher-order operator). The run stops there (`_Refused`, a
BaseException) and `tracing._trace_program` captures the program again from the start with make_fx,
on new inputs under a new process group. An exception the program raises propagates as from make_fx.

Every node is annotated by the same hooks as make_fx's (`source.annotate_node`: user source lines;
`extra_node_meta`). `graph_signature` / `signature_differences` compare two graphs node for node:
``tests/test_direct_trace.py`` checks examples of every parallel style and user spellings, and
``GG_CHECK_DIRECT_TRACE=1`` checks every program a test suite run captures (`tracing._make_fx_signature`).
"""

from __future__ import annotations

import operator
import re
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx._lazy_graph_module import _make_graph_module
from torch.fx.experimental.proxy_tensor import _should_save_eager_input_vals, extract_val
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, autograd_would_have_decomposed

from gg_notebook.capture.source import annotate_node

_DEVICE_QUERY = torch.ops.prim.device.default
_LIFT_FRESH = torch.ops.aten.lift_fresh.default
_LIFT_FRESH_COPY = torch.ops.aten.lift_fresh_copy.default
_IS_NONZERO = torch.ops.aten.is_nonzero.default
_CONSTANT_NUMEL_LIMIT = 1  # make_fx's (proxy_tensor.CONSTANT_NUMEL_LIMIT)
# never evaluated for a known value (make_fx would run them for real: under the fake process group
# they communicate nothing, and an ``.item()`` of the result would bake the local value in)
_COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"})
_PLAIN = (FakeTensor, torch.Tensor, torch.nn.Parameter)
_LITERAL = (int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout,
            torch.memory_format)
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


_IMPLICIT: dict = {}


def _has_implicit_kernel(func) -> bool:
    """Whether ``func.decompose`` does anything (make_fx's proxy mode calls it where autograd would
    have decomposed, and keeps the call as it is where it returns NotImplemented)."""
    has = _IMPLICIT.get(func)
    if has is None:
        dk = torch._C.DispatchKey.CompositeImplicitAutograd
        has = _IMPLICIT[func] = dk in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), dk)
    return has


def _forget_fake_constants(out: Any) -> None:
    """A collective's results are never known by value: the fake mode's own constant propagation
    (small tensors computed from ``torch.tensor(...)``) ran it on the local values, and an ``.item()``
    would read them (the fake process group communicates nothing)."""
    for o in (out if isinstance(out, (list, tuple)) else [out]):
        if isinstance(o, (list, tuple)):
            _forget_fake_constants(o)
        elif isinstance(o, FakeTensor) and o.constant is not None:
            o.constant = None


def _eager_input_val(v: Any) -> Any:
    """make_fx's ``eager_input_vals`` entry for one argument (`PythonKeyTracer.create_node`)."""
    if not isinstance(v, fx.Node) or "val" not in v.meta:
        return None
    val = v.meta["val"]
    if isinstance(val, torch.Tensor) and not isinstance(val, FakeTensor):
        return None
    return extract_val(val)


def _leaves(args: tuple, kwargs: dict) -> list:
    """The leaves of an operator call's arguments (lists and tuples flattened), in order: what
    ``pytree.tree_leaves((args, kwargs))`` gives for them, without its generality (every call)."""
    out: list = []

    def walk(x):
        if isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        else:
            out.append(x)

    for a in args:
        if isinstance(a, (list, tuple)):
            walk(a)
        else:
            out.append(a)
    for a in kwargs.values():
        if isinstance(a, (list, tuple)):
            walk(a)
        else:
            out.append(a)
    return out


class _NotDirect(Exception):
    """A call the direct tracer does not reproduce as make_fx would."""


class _Refused(BaseException):
    """Ends a run the direct tracer refused (a BaseException: ``except Exception`` in the traced
    program does not swallow it)."""


class DirectTracer(TorchDispatchMode):
    """Writes every operator call into ``self.graph`` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        # id(tensor) -> (weak reference, the node of its latest value); weak, as make_fx's tracker:
        # a strong reference would make autograd detach every factory result (`make_variable`
        # copies shared tensors); keyed by id, checked by identity (cheaper than weak keys)
        self.nodes: dict[int, tuple] = {}
        self.keep: list = []  # script objects seen: their ids must not be reused
        self.objects: dict = {}  # hash of a script object a call returned (its C++ identity) -> (it, its node)
        self.constants: dict[int, tuple] = {}  # id(tensor) -> (weak ref, its value), where make_fx knows it
        self.tensor_attrs: dict = {}  # real tensor or script object -> the name of its attribute
        self.n_constants = 0
        self.n_objects = 0
        self.refused: str | None = None  # why make_fx must trace this program instead
        self.paused = False  # inside `untraced` (make_fx's proxy mode is then off too)
        self.memo = None  # a `FakeDispatchMemo` of the fake mode below, or None

    # ------------------------------------------------------------------------------------ values
    def placeholders(self, args: Sequence[Any]) -> None:
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                raise _NotDirect(f"input {i} is not a tensor")
            node = self.graph.placeholder(f"arg{i}_1")
            node.meta["val"] = extract_val(a, include_real=True)
            self._set_tensor_meta(node, a)
            self._track_tensor(a, node)

    def _set_tensor_meta(self, node: fx.Node, t: torch.Tensor) -> None:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        if not t.is_sparse:
            node.meta["tensor_meta"] = _extract_tensor_metadata(t)

    def node_of(self, t: torch.Tensor) -> fx.Node | None:
        entry = self.nodes.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def constant_of(self, t: torch.Tensor) -> torch.Tensor | None:
        entry = self.constants.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _track_tensor(self, t: torch.Tensor, node: fx.Node) -> None:
        self.nodes[id(t)] = (weakref.ref(t), node)

    def _arg(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            node = self.node_of(x)
            if node is not None:
                return node
            if isinstance(x, FakeTensor) or type(x) not in _PLAIN:
                raise _NotDirect(f"a tensor of shape {tuple(x.shape)} that no traced call produced")
            # a real tensor: a constant attribute, read by a get_attr node per use (as make_fx)
            name = self.tensor_attrs.get(x)
            if name is None:
                name = self.tensor_attrs[x] = f"_tensor_constant{self.n_constants}"
                self.n_constants += 1
                setattr(self.root, name, x)
            node = self.graph.get_attr(name)
            node.meta["val"] = extract_val(x)  # as make_fx's tracer does for tensor constants
            annotate_node(node)
            return node
        if isinstance(x, (list, tuple)):
            return type(x)(self._arg(y) for y in x)
        if isinstance(x, torch.ScriptObject):
            entry = self.objects.get(hash(x))  # by hash (its C++ identity), as make_fx's tracker
            if entry is not None:
                return entry[1]
            self.keep.append(x)
            name = self.tensor_attrs.get(x)  # as make_fx: one attribute per object, a get_attr per use
            if name is None:
                name = self.tensor_attrs[x] = f"_torchbind_obj{self.n_objects}"
                self.n_objects += 1
                setattr(self.root, name, x)
            node = self.graph.get_attr(name)
            annotate_node(node)
            return node
        if isinstance(x, _SYMBOLIC):
            raise _NotDirect("a symbolic size")
        if isinstance(x, _LITERAL):
            return x
        raise _NotDirect(f"an argument of type {type(x).__name__}")

    def _track(self, out: Any, node: fx.Node, constant: Any = None) -> None:
        """make_fx's `track_tensor_tree`: results get their node (lists and tuples a getitem each),
        and their value where make_fx's constant propagation knows it."""
        if isinstance(out, torch.Tensor):
            node.meta["val"] = extract_val(out)  # (no "tensor_meta": nothing here reads it, "val" says it)
            self._track_tensor(out, node)
            if constant is not None:
                self.constants[id(out)] = (weakref.ref(out), constant)
            elif id(out) in self.constants:  # an in-place call on a known value: no longer known
                del self.constants[id(out)]
        elif isinstance(out, (list, tuple)):
            node.meta["val"] = extract_val(out)
            for i, o in enumerate(out):
                item = self.graph.call_function(operator.getitem, (node, i))
                annotate_node(item)
                self._track(o, item, constant[i] if constant is not None else None)
        elif isinstance(out, torch.ScriptObject):
            node.meta["val"] = out
            self.objects[hash(out)] = (out, node)  # (held: the hash must not be reused)
        elif isinstance(out, _SYMBOLIC):
            raise _NotDirect("a symbolic result")
        elif isinstance(out, dict):
            raise _NotDirect("a call returning a dict")

    # ---------------------------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE_QUERY or self.refused is not None or self.paused:
            return func(*args, **kwargs)
        if any(t not in _PLAIN for t in types):
            return NotImplemented  # a tensor subclass (DTensor) runs first and calls plain operators
        if not isinstance(func, torch._ops.OpOverload):
            self._refuse(func, "not an operator overload")
        leaves = _leaves(args, kwargs)
        if _has_implicit_kernel(func) and autograd_would_have_decomposed(func, leaves):
            # make_fx's proxy mode runs the CompositeImplicitAutograd kernel here, its calls traced
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func is _IS_NONZERO:  # as make_fx: ``bool(t)`` is ``(t != 0).item()``
            with self:
                torch._check(args[0].numel() == 1,
                             lambda: "Boolean value of Tensor with more than one value is ambiguous")
                return (args[0] != 0).item()
        # make_fx's constant propagation: tensors known by value (small ``torch.tensor(...)``s and
        # what is computed from them alone) let data-dependent calls run for real, leaving no node
        data_dependent = torch.Tag.data_dependent_output in func.tags
        if self.constants or data_dependent:
            tracked = [self.constant_of(t) for t in leaves
                       if isinstance(t, torch.Tensor) and self.node_of(t) is not None]
        else:  # nothing is known by value and nothing asks (most calls): no lookups
            tracked = [None]
        all_constant = all(c is not None for c in tracked)
        if data_dependent and all_constant:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            const_args, const_kwargs = self._constant_args(args, kwargs)
            with unset_fake_temporarily():
                return func(*const_args, **const_kwargs)
        try:
            node = self._node(func, args, kwargs)
        except _NotDirect as e:
            self._refuse(func, str(e))
        out = func(*args, **kwargs) if self.memo is None else self.memo(func, args, kwargs)
        if func.namespace in _COLLECTIVE_NAMESPACES:
            _forget_fake_constants(out)
        constant = None
        if func is _LIFT_FRESH and out.numel() <= _CONSTANT_NUMEL_LIMIT:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                constant = args[0].clone()
        elif (torch.Tag.nondeterministic_seeded not in func.tags and all_constant
              and func.namespace not in _COLLECTIVE_NAMESPACES
              and any(c is not None for c in tracked)
              and all(o.numel() <= _CONSTANT_NUMEL_LIMIT for o in pytree.tree_leaves(out)
                      if isinstance(o, torch.Tensor))):
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            const_args, const_kwargs = self._constant_args(args, kwargs)
            with unset_fake_temporarily():
                constant = func(*const_args, **const_kwargs)
        try:
            self._track(out, node, constant)
        except _NotDirect as e:
            self._refuse(func, str(e))
        return out

    def _refuse(self, func, why: str) -> None:
        """Stop: make_fx traces this program (the run ends here, unless the program catches
        BaseException; what it does afterwards is passed through untraced)."""
        self.refused = f"{func}: {why}"
        raise _Refused(self.refused)

    def _constant_args(self, args, kwargs):
        """``(args, kwargs)`` with every tracked tensor replaced by its known value."""
        def const(x):
            return self.constant_of(x) if isinstance(x, torch.Tensor) and self.node_of(x) is not None else x

        return pytree.tree_map(const, (args, kwargs))

    def _node(self, func, args, kwargs) -> fx.Node:
        target = _LIFT_FRESH_COPY if func is _LIFT_FRESH else func
        node_args = tuple(self._arg(a) for a in args)
        node_kwargs = {k: self._arg(v) for k, v in kwargs.items()}
        name = self.graph._target_to_str(target.overloadpacket.__name__)
        node = self.graph.create_node("call_function", target, node_args, node_kwargs, name=name)
        if _should_save_eager_input_vals(target, (node_args, node_kwargs)):  # as make_fx's tracer
            node.meta["eager_input_vals"] = fx.node.map_aggregate((node_args, node_kwargs), _eager_input_val)
        annotate_node(node)
        return node

    # ------------------------------------------------------------------------------------ finish
    def output(self, out: Any) -> fx.GraphModule:
        def arg(x):
            if isinstance(x, (list, tuple)):
                return type(x)(arg(y) for y in x)
            if isinstance(x, dict):
                return {k: arg(v) for k, v in x.items()}
            return self._arg(x)

        self.graph.output(arg(out))
        gm = _make_graph_module(self.root, self.graph)
        self.keep = []
        self.nodes = {}
        self.constants = {}
        self.tensor_attrs = {}
        self.objects = {}
        return gm


    def forget_constant(self, t: torch.Tensor) -> None:
        """``t``'s value is no longer known (a collective's buffer: `collectives._not_constant`)."""
        self.constants.pop(id(t), None)

    def follow_data_assignment(self, target: torch.Tensor, value: torch.Tensor) -> bool:
        """``target.data = value``: later readers of ``target`` read ``value``'s node (as
        `data_assignment.follow_data_assignments` makes make_fx do); False if ``value`` has none."""
        node = self.node_of(value)
        if node is None:
            return False
        self.nodes[id(target)] = (weakref.ref(target), node)
        return True


_active: DirectTracer | None = None


class _TorchFunctionLikeMakeFx(TorchFunctionMode):
    """The torch-function mode make_fx keeps on (its metadata mode), doing nothing: code that asks
    ``has_torch_function`` takes the same path as under make_fx."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@contextmanager
def untraced() -> Iterator[None]:
    """Calls inside leave no node (for `collectives._outside_trace`, which turns make_fx's proxy
    modes off with ``disable_proxy_modes_tracing``)."""
    tracer = _active
    if tracer is None:
        yield
        return
    saved, tracer.paused = tracer.paused, True
    try:
        yield
    finally:
        tracer.paused = saved


def active_tracer() -> DirectTracer | None:
    """The `DirectTracer` running a program right now (for `data_assignment`), if any."""
    return _active


@contextmanager
def _like_make_fx() -> Iterator[None]:
    """What a program sees under make_fx (fake tracing) besides the proxy mode: a torch-function
    mode, ``torch.fx`` saying it is tracing (``is_fx_tracing()``), autocast's cache off, and torch's ``disable_proxy_modes_tracing``
    keeping work out of the graph (DeviceMesh slicing, ...). Where torch asks whether a proxy mode is
    on to decide what to run (activation checkpointing's ``_is_compiling``), the program is refused."""
    import torch.fx._symbolic_trace as symbolic_trace
    import torch.fx.experimental.proxy_tensor as proxy_tensor

    saved = symbolic_trace._is_fx_tracing_flag
    disable = proxy_tensor.disable_proxy_modes_tracing

    @contextmanager
    def disable_tracing():  # torch's code that keeps work out of make_fx's graph keeps it out of ours
        with disable() as mode, untraced():
            yield mode

    import torch.utils.checkpoint as checkpoint

    is_compiling = checkpoint._is_compiling

    def asks_for_make_fx(func, args, kwargs):  # selective activation checkpointing asks
        if _active is not None and not _active.paused:
            _active._refuse(func, "activation checkpointing asks whether make_fx traces")
        return is_compiling(func, args, kwargs)

    symbolic_trace._is_fx_tracing_flag = True
    proxy_tensor.disable_proxy_modes_tracing = disable_tracing
    checkpoint._is_compiling = asks_for_make_fx
    try:
        with proxy_tensor.disable_autocast_cache(), _TorchFunctionLikeMakeFx():
            yield
    finally:
        symbolic_trace._is_fx_tracing_flag = saved
        proxy_tensor.disable_proxy_modes_tracing = disable
        checkpoint._is_compiling = is_compiling


def trace_directly(fn: Callable, args: Sequence[torch.Tensor]) -> tuple[fx.GraphModule | None, str | None]:
    """``fn(*args)`` (fake tensors of one fake mode) traced by a `DirectTracer`: (graph, None), or
    (None, why) when make_fx must trace it (the function then ran once for nothing). What ``fn``
    raises propagates, as out of make_fx."""
    global _active
    from torch._guards import detect_fake_mode

    from gg_notebook.capture.fake_memo import FakeDispatchMemo

    mode = detect_fake_mode(tuple(args))
    if mode is None:
        return None, "the inputs are not fake tensors"
    tracer = DirectTracer()
    tracer.memo = FakeDispatchMemo(mode)
    saved, _active = _active, tracer
    try:
        tracer.placeholders(args)
        with _like_make_fx(), mode, tracer:
            out = fn(*args)
        if tracer.refused is not None:
            return None, tracer.refused
        return tracer.output(out), None
    except _NotDirect as e:
        return None, str(e)
    except _Refused as e:
        return None, str(e)
    except Exception:
        if tracer.refused is not None:  # the program turned the refusal into its own error
            return None, tracer.refused
        raise
    finally:
        _active = saved


# ------------------------------------------------------------------------------------ checking


def _val_key(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), tuple(v.stride()) if v.layout == torch.strided else (), v.dtype,
                str(v.device), v.requires_grad, v.storage_offset() if v.layout == torch.strided else 0)
    if isinstance(v, dict):
        return tuple((k, _val_key(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return tuple(_val_key(x) for x in v)
    if isinstance(v, torch.ScriptObject):
        return "ScriptObject"
    return repr(v)


def _groups_by_ranks(args: Any) -> Any:
    """Process group names (functional collectives' arguments) as their ranks: groups made by two
    runs in one process get other names."""
    def key(x):
        if isinstance(x, str) and dist.is_initialized():
            try:
                from torch.distributed.distributed_c10d import _resolve_process_group

                return ("group", tuple(dist.get_process_group_ranks(_resolve_process_group(x))))
            except Exception:  # noqa: BLE001 - not a group's name
                return x
        return x

    return pytree.tree_map(key, args)


def _frames_key(frames: Any) -> Any:
    """User frames without make_fx's generated wrapper (file ``<string>``)."""
    return [f for f in frames if f[0] != "<string>"] if isinstance(frames, list) else frames


def graph_signature(gm: fx.GraphModule) -> list[tuple]:
    """``gm`` as plain, picklable data, node by node: kind, operator, name, arguments (nodes by
    position, process groups by ranks), values (shape, strides, dtype, device, requires_grad,
    storage offset), user frames and every other metadata entry (by repr), tensor constants by value."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    batches: dict = {}  # p2p batch numbers count on in a process: kept as a partition
    out = []
    for n in nodes:
        args = repr(_groups_by_ranks(fx.node.map_arg((n.args, n.kwargs), lambda m: ("node", index[m]))))
        meta = []
        for k in sorted(n.meta):
            v = n.meta[k]
            if k in ("val", "eager_input_vals"):
                v = _val_key(v)
            elif k == "tensor_meta":
                continue  # derived from "val"
            elif k == "gg_frames":
                v = _frames_key(v)
            elif k == "stack_trace":
                v = [ln for ln in re.split(r"(?:^|\n)  File ", v) if ln and not ln.startswith('"<string>"')] \
                    if isinstance(v, str) else v
            elif k == "gg_p2p_batch":
                v = batches.setdefault(v, len(batches))
            meta.append((k, repr(v)))
        const = None
        if n.op == "get_attr":
            c = getattr(gm, n.target, None)
            if isinstance(c, torch.Tensor):
                const = (str(c.dtype), tuple(c.shape), c.detach().cpu().reshape(-1).tolist()
                         if c.device.type != "meta" and c.numel() <= 4096 else None)
        out.append((n.op, str(n.target), n.name, args, tuple(meta), const))
    return out


def signature_differences(made: list[tuple], direct: list[tuple], limit: int = 5) -> list[str]:
    """Where two `graph_signature`s differ (make_fx's first), at most ``limit`` places."""
    out: list[str] = []
    if len(made) != len(direct):
        out.append(f"{len(made)} nodes (make_fx) against {len(direct)} (direct)")
    for i, (x, y) in enumerate(zip(made, direct)):
        if len(out) >= limit:
            break
        if x[:4] != y[:4]:
            out.append(f"node {i}: make_fx {x[:4]} / direct {y[:4]}")
            break
        if x[4] != y[4]:
            mx, my = dict(x[4]), dict(y[4])
            keys = sorted(k for k in set(mx) | set(my) if mx.get(k) != my.get(k)
                          # make_fx's generated wrapper (file <string>) taken as the innermost user
                          # line: the direct tracer names the user's line instead
                          and not (k == "gg_source" and mx.get(k, "").startswith("'<string>")))
            if not keys:
                continue
            out.append(f"node {x[2]}: metadata {keys}: " + "; ".join(_first_difference(mx.get(k, "-"), my.get(k, "-"))
                                                                      for k in keys[:2]))
        if x[5] != y[5]:
            out.append(f"node {x[2]}: constant differs")
    return out


def _first_difference(a: str, b: str) -> str:
    """The two strings around where they first differ."""
    i = next((k for k, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
    return f"{a[max(0, i - 60):i + 100]!r} / {b[max(0, i - 60):i + 100]!r}"


def graph_differences(made: fx.GraphModule, direct: fx.GraphModule, limit: int = 5) -> list[str]:
    """How the direct graph differs from make_fx's (empty: the same graph); see `graph_signature`."""
    return signature_differences(graph_signature(made), graph_signature(direct), limit)
