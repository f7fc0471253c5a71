"""Collectives: value-semantics shims while tracing, graph rewriting to `collective_result`, matching.

After `rewrite_collectives`, every tensor a collective produces is one node
``call_function[target=collective_result](input_node)`` whose ``meta["gg_collective"]`` is a
`CollectiveInfo` and ``meta["val"]`` the result's fake tensor. The c10d / _c10d_functional ops,
their getitem / wait_tensor plumbing and the ProcessGroup / ReduceOp torchbind attributes are gone.

Communicators. A collective belongs to one communicator, the process group it was issued on,
identified by the group's name as resolved while tracing (``"0"`` is the default group, then
``new_group`` / DeviceMesh groups in creation order, as in a real job) together with its ranks.
Two groups over the same ranks are two communicators: independent queues whose collectives never
match each other. A collective's ``index`` is its position in program order among this rank's
collectives on *its communicator*; every collective (barriers too) also blocks until every member
has issued it, so the ranks must issue collectives in one consistent order (`check_issue_order`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import sys
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
import torch.fx as fx

from gg_notebook.capture.errors import CaptureError
from gg_notebook.capture.source import extra_node_meta, format_source, is_user_file


def collective_result(*inputs):
    """Graph marker for one tensor produced by a collective; never executed."""
    raise RuntimeError(
        "collective_result is a graph marker for a collective's result; it cannot be executed. "
        "Interpret it with node.meta['gg_collective']."
    )


P2P_KINDS = ("send", "recv")


@dataclass(frozen=True)
class CollectiveInfo:
    kind: str  # all_reduce | all_gather | all_gather_into_tensor | reduce_scatter_tensor | all_to_all_single | broadcast
    reduce_op: str | None  # sum | max | min | avg | product (reductions), else None
    group: tuple[int, ...]  # global ranks of the group, in group order
    index: int  # program order among this rank's collectives on this communicator
    out_index: int = 0  # list all_gather: whose tensor this node is (group order)
    input_split_sizes: tuple[int, ...] | None = None
    output_split_sizes: tuple[int, ...] | None = None
    src: int | None = None  # broadcast source (global rank)
    comm: str = ""  # the process group's name as resolved while tracing ("0": the default group)
    comm_label: str = field(default="", compare=False)  # the communicator in words, for messages
    # point-to-point (kind "send" / "recv", group (src, dst)): whether the call waits for its peer
    # (dist.send / dist.recv) or only posts the transfer (isend / irecv / batch_isend_irecv)
    blocking: bool = field(default=True, compare=False)
    # point-to-point posted by one dist.batch_isend_irecv call: its number in this rank's program
    # (the batch's transfers are posted together, whatever their order in the list)
    batch: int | None = field(default=None, compare=False)

    @property
    def p2p(self) -> bool:
        return self.kind in P2P_KINDS

    def describe(self) -> str:
        return f"{self.kind}({self.reduce_op})" if self.reduce_op else self.kind

    @property
    def communicator(self) -> tuple[str, tuple[int, ...]]:
        """The communicator's identity: (process group name, ranks)."""
        return self.comm, tuple(self.group)

    @property
    def key(self) -> tuple[str, tuple[int, ...], int]:
        """What the members of one collective share: (communicator name, ranks, index)."""
        return self.comm, tuple(self.group), self.index

    def where(self) -> str:
        """The communicator in words, e.g. "the default group (ranks 0, 1)"."""
        return self.comm_label or f"group {tuple(self.group)}"


@dataclass
class MatchedCollective:
    """One collective as issued by every member of ``group``: ``nodes[rank]`` is the result node name
    in that rank's graph (a tuple of names, in group order, for the list all_gather)."""

    group: tuple[int, ...]
    index: int
    kind: str
    reduce_op: str | None
    nodes: dict[int, str | tuple[str, ...]]
    comm: str = ""
    comm_label: str = ""


Shape = tuple  # (shape tuple, dtype) of a tensor, or None


@dataclass(frozen=True)
class IssuedCollective:
    """One collective call as one rank issued it, in plain data (it crosses process boundaries).

    ``info`` is the CollectiveInfo of its first result; ``nodes`` are its result nodes in the
    rank's graph (several for a list all_gather or a multi-tensor all_reduce, none for a barrier),
    ``inputs`` / ``outputs`` the (shape, dtype) of each result's input and of each result."""

    rank: int
    info: CollectiveInfo
    source: str | None
    nodes: tuple[str, ...] = ()
    inputs: tuple[Shape, ...] = ()
    outputs: tuple[Shape, ...] = ()


# --------------------------------------------------------------------------------------------------
# Shims: the in-place dist API writes into the caller's tensors. Functionalization does not see those
# writes when the tensor is a view (e.g. ``dist.all_reduce(buf[:n])``, ``all_gather(list(out.chunk(W)))``)
# and all_to_all's write is never visible (its op returns only a Work). So while tracing, each
# ProcessGroup method runs the real op on fresh buffers and copies the result back with ``copy_``,
# which functionalization handles (including views). Nodes created by the shim carry
# meta["gg_shim"] and are simplified away by `rewrite_collectives`.

_PG = torch._C._distributed_c10d.ProcessGroup


def _not_constant(t: torch.Tensor) -> torch.Tensor:
    """Make make_fx forget that ``t`` (a buffer the shim created) holds a known constant.

    make_fx evaluates an operator eagerly when every tensor argument is a small known constant
    (``torch.tensor(float(n))``, numel <= 1) and remembers the result as the output's value. For a
    collective under the fake process group that value is wrong (the fake group communicates
    nothing), and a later ``.item()`` would bake it into the graph. A collective always gets one
    of the shim's own buffers, so making those non-constant keeps every collective symbolic: its
    result is a traced value and ``.item()`` on it is reported as data-dependent."""
    from torch.fx.experimental import proxy_tensor as pt

    if getattr(t, "constant", None) is not None:  # a FakeTensor that remembers a small real value
        t.constant = None
    from gg_notebook.capture.direct_trace import active_tracer

    direct = active_tracer()
    if direct is not None:  # the direct tracer's own record of known values
        direct.forget_constant(t)
    mode = pt.get_proxy_mode()
    if mode is None:
        return t
    try:
        slot = pt.get_proxy_slot(t, mode.tracer, None)
        if slot is not None and slot.constant is not None:
            mode.tracer.tensor_tracker[t] = pt._ProxyTensor(slot.proxy, None)
    except Exception:  # pragma: no cover - private make_fx API moved: constants stay folded
        pass
    return t


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return _not_constant(torch.empty_like(t, memory_format=torch.contiguous_format))


def _shim_inplace_list(orig, reads_input: bool = True):
    """For methods ``(tensors, *rest)`` that write their result into ``tensors`` (allreduce,
    broadcast; recv with ``reads_input=False``: it only writes): run on fresh copies (fresh buffers),
    then copy back, so functionalization sees the writes."""

    def method(self, tensors, *args, **kwargs):
        if not isinstance(tensors, (list, tuple)):
            return orig(self, tensors, *args, **kwargs)
        with extra_node_meta(gg_shim=True):
            tmps = [_not_constant(t.clone(memory_format=torch.contiguous_format)) if reads_input else _fresh(t)
                    for t in tensors]
        work = orig(self, tmps, *args, **kwargs)
        with extra_node_meta(gg_shim=True):
            for t, tmp in zip(tensors, tmps):
                t.copy_(tmp)
        return work

    return method


def _shim_allgather(orig):
    def allgather(self, output_lists, inputs, *args, **kwargs):
        if not (isinstance(output_lists, (list, tuple)) and output_lists and isinstance(output_lists[0], (list, tuple))):
            return orig(self, output_lists, inputs, *args, **kwargs)
        with extra_node_meta(gg_shim=True):
            tmps = [[_fresh(t) for t in lst] for lst in output_lists]
        work = orig(self, tmps, inputs, *args, **kwargs)
        with extra_node_meta(gg_shim=True):
            for lst, tlst in zip(output_lists, tmps):
                for t, tmp in zip(lst, tlst):
                    t.copy_(tmp)
        return work

    return allgather


def _shim_single_output(orig):
    """For methods ``(output, input, *rest)``: all_gather_single, reduce_scatter_single, all_to_all_single."""

    def method(self, output, input, *args, **kwargs):
        with extra_node_meta(gg_shim=True):
            tmp = _fresh(output)
        work = orig(self, tmp, input, *args, **kwargs)
        with extra_node_meta(gg_shim=True):
            output.copy_(tmp)
        return work

    return method


def _shim_recv(orig):
    """``recv(tensors, src, tag)`` writes into ``tensors``: receive into fresh buffers, copy back."""
    return _shim_inplace_list(orig, reads_input=False)


def _blocking_p2p(orig):
    """dist.send / dist.recv wait for their peer; isend / irecv (and batch_isend_irecv) only post."""

    @functools.wraps(orig)
    def call(*args, **kwargs):
        with extra_node_meta(gg_blocking=True):
            return orig(*args, **kwargs)

    return call


_batches = itertools.count()


def _batched_p2p(orig):
    """dist.batch_isend_irecv posts every transfer of its list together: its nodes carry one batch number."""

    @functools.wraps(orig)
    def call(*args, **kwargs):
        with extra_node_meta(gg_p2p_batch=next(_batches)):
            return orig(*args, **kwargs)

    return call


def _group_rank_and_size(pg) -> tuple[int, int]:
    return int(pg.rank()), int(pg.size())


def _site_words() -> tuple[str, str | None]:
    """(" by `code` at file:line", "file:line") of the user's call, or ("", None)."""
    site = _user_site()
    if site is None:
        return "", None
    src, text = site
    return (f" by `{text}` at {src}" if text else f" at {src}"), src


def _list_form_error(pg, what: str, problem: str, fix: str) -> CaptureError:
    rank = dist.get_rank() if dist.is_initialized() else None
    where, src = _site_words()
    return CaptureError(f"rank {rank} calls {what}{where}: {problem}; {fix}.", rank=rank, source=src)


def _whole_of(pieces: list) -> torch.Tensor | None:
    """The tensor ``pieces`` tile, when they are consecutive contiguous views of one contiguous
    tensor in order (``list(y.chunk(W))``): the collective then reads that tensor itself, one value,
    instead of a concatenation of its pieces."""
    base = getattr(pieces[0], "_base", None) if pieces else None
    if base is None or any(getattr(p, "_base", None) is not base for p in pieces):
        return None
    try:
        if not base.is_contiguous() or not all(p.is_contiguous() for p in pieces):
            return None
        off = base.storage_offset()
        for p in pieces:
            if p.storage_offset() != off:
                return None
            off += p.numel()
        if off != base.storage_offset() + base.numel():
            return None
    except Exception:  # noqa: BLE001 - storage not inspectable: concatenate instead
        return None
    return base


def _shim_reduce_scatter_list(orig):
    """``dist.reduce_scatter(output, input_list)``: the list form is ``reduce_scatter_tensor``
    of the inputs concatenated along dim 0 (stacked for 0-d tensors): one collective, whose input
    is a plain data movement of the list."""

    def reduce_scatter(self, outputs, inputs, *args, **kwargs):
        if not (isinstance(outputs, (list, tuple)) and len(outputs) == 1 and isinstance(inputs, (list, tuple))
                and len(inputs) == 1 and isinstance(inputs[0], (list, tuple))):
            return orig(self, outputs, inputs, *args, **kwargs)
        out, pieces = outputs[0], list(inputs[0])
        _, size = _group_rank_and_size(self)
        if len(pieces) != size or any(p.shape != out.shape or p.dtype != out.dtype for p in pieces):
            raise _list_form_error(
                self, "dist.reduce_scatter(output, input_list)",
                f"input_list holds {len(pieces)} tensors of shapes {[tuple(p.shape) for p in pieces]} for an output of "
                f"shape {tuple(out.shape)} on a group of {size} ranks (a real run fails or needs uneven splits)",
                f"pass exactly {size} tensors, each of the output's shape and dtype",
            )
        whole = _whole_of(pieces)
        flat = ((size * out.shape[0],) + tuple(out.shape[1:])) if out.dim() else (size,)
        if whole is not None:
            src = whole.reshape(flat)
        else:
            src = torch.cat(pieces, 0) if out.dim() else torch.stack(pieces)
        return self._reduce_scatter_base(out, src, *args, **kwargs)

    return reduce_scatter


def _shim_alltoall_list(orig):
    """``dist.all_to_all(output_list, input_list)``: ``all_to_all_single`` of the inputs
    concatenated along dim 0 with split sizes = the list entries' sizes (flattened when the
    entries do not agree beyond dim 0), the output read back into the list's tensors."""

    def alltoall(self, outputs, inputs, *args, **kwargs):
        if not (isinstance(outputs, (list, tuple)) and isinstance(inputs, (list, tuple))):
            return orig(self, outputs, inputs, *args, **kwargs)
        _, size = _group_rank_and_size(self)
        ts = list(outputs) + list(inputs)
        if len(outputs) != size or len(inputs) != size or len({t.dtype for t in ts}) != 1:
            raise _list_form_error(
                self, "dist.all_to_all(output_list, input_list)",
                f"it passes {len(outputs)} outputs and {len(inputs)} inputs on a group of {size} ranks"
                + ("" if len({t.dtype for t in ts}) <= 1 else " with different dtypes"),
                f"pass one input and one output tensor per rank of the group, all of one dtype",
            )
        rows = all(t.dim() >= 1 for t in ts) and len({tuple(t.shape[1:]) for t in ts}) == 1
        whole = _whole_of(list(inputs))
        if rows:
            src = whole.reshape((-1,) + tuple(ts[0].shape[1:])) if whole is not None else torch.cat(list(inputs), 0)
            in_splits = [int(t.shape[0]) for t in inputs]
            out_splits = [int(t.shape[0]) for t in outputs]
            buf = _not_constant(torch.empty((sum(out_splits),) + tuple(ts[0].shape[1:]), dtype=ts[0].dtype,
                                            device=ts[0].device))
        else:
            src = whole.reshape(-1) if whole is not None else torch.cat([t.reshape(-1) for t in inputs], 0)
            in_splits = [t.numel() for t in inputs]
            out_splits = [t.numel() for t in outputs]
            buf = _not_constant(torch.empty((sum(out_splits),), dtype=ts[0].dtype, device=ts[0].device))
        from torch.distributed import AllToAllOptions

        opts = args[0] if args else kwargs.get("opts", AllToAllOptions())
        work = self.alltoall_base(buf, src, out_splits, in_splits, opts)
        off = 0
        for t, k in zip(outputs, out_splits):
            t.copy_(buf[off:off + k].view(t.shape))
            off += k
        return work

    return alltoall


def _root_list(pg, lists, like, size: int, call: str, name: str, what: str, role: str, noun: str) -> list:
    """The root's tensor list of ``dist.gather`` / ``dist.scatter``: ``size`` tensors of ``like``'s
    shape and dtype, or the error naming the call."""
    lst = list(lists[0]) if lists and isinstance(lists[0], (list, tuple)) else []
    if len(lst) != size or any(t.shape != like.shape or t.dtype != like.dtype for t in lst):
        raise _list_form_error(
            pg, call,
            f"{name} holds {len(lst)} tensors of shapes {[tuple(t.shape) for t in lst]} for {what} "
            f"of shape {tuple(like.shape)} on a group of {size} ranks",
            f"on the {role} pass {size} tensors of the {noun}'s shape and dtype",
        )
    return lst


def _shim_gather(orig):
    """``dist.gather(tensor, gather_list, dst)``: an all_gather whose results only the destination
    reads (every rank issues it; the others' results are unused)."""

    def gather(self, outputs, inputs, opts=None, *args, **kwargs):
        if not (isinstance(inputs, (list, tuple)) and len(inputs) == 1 and opts is not None):
            return orig(self, outputs, inputs, *([opts] if opts is not None else []), *args, **kwargs)
        rank, size = _group_rank_and_size(self)
        x = inputs[0]
        if rank == opts.rootRank:
            lst = _root_list(self, outputs, x, size, "dist.gather(tensor, gather_list, dst)", "gather_list",
                             "a tensor", "destination", "tensor")
        else:
            lst = [_fresh(x) for _ in range(size)]
        return self.allgather([lst], [x], torch._C._distributed_c10d.AllgatherOptions())

    return gather


def _shim_scatter(orig):
    """``dist.scatter(tensor, scatter_list, src)``: a broadcast of the source's list (stacked)
    from which every rank takes its own entry."""

    def scatter(self, outputs, inputs, opts=None, *args, **kwargs):
        if not (isinstance(outputs, (list, tuple)) and len(outputs) == 1 and opts is not None):
            return orig(self, outputs, inputs, *([opts] if opts is not None else []), *args, **kwargs)
        rank, size = _group_rank_and_size(self)
        out = outputs[0]
        if rank == opts.rootRank:
            lst = _root_list(self, inputs, out, size, "dist.scatter(tensor, scatter_list, src)", "scatter_list",
                             "an output", "source", "output")
            buf = torch.stack(lst)
        else:
            buf = _not_constant(torch.empty((size,) + tuple(out.shape), dtype=out.dtype, device=out.device))
        from torch.distributed import BroadcastOptions

        b = BroadcastOptions()
        b.rootRank = opts.rootRank
        work = self.broadcast([buf], b)
        out.copy_(buf[rank])
        return work

    return scatter


_SHIMS = {
    "reduce_scatter": _shim_reduce_scatter_list,
    "alltoall": _shim_alltoall_list,
    "gather": _shim_gather,
    "scatter": _shim_scatter,
    "allreduce": _shim_inplace_list,
    "broadcast": _shim_inplace_list,
    "allgather": _shim_allgather,
    "all_gather_single": _shim_single_output,
    "_allgather_base": _shim_single_output,
    "reduce_scatter_single": _shim_single_output,
    "_reduce_scatter_base": _shim_single_output,
    "all_to_all_single": _shim_single_output,
    "alltoall_base": _shim_single_output,
    "recv": _shim_recv,
}
_BLOCKING_P2P = ("send", "recv")
_BATCHED_P2P = ("batch_isend_irecv",)


_OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")


def _refuse_object_collective(name: str):
    def refuse(*args, **kwargs):
        rank = dist.get_rank() if dist.is_initialized() else None
        where, src = _site_words()
        raise CaptureError(
            f"rank {rank} calls dist.{name}{where}: collectives on Python objects "
            "cannot be traced (the objects travel as pickled bytes, so their values are not known while "
            "tracing and every later use of them would be data-dependent). Exchange tensors instead "
            "(dist.all_gather / all_gather_into_tensor / broadcast of a tensor), or compute the value on "
            "every rank from shapes, the rank and the configuration.",
            rank=rank, source=src,
        )

    refuse.__name__ = name
    return refuse


def _outside_trace(fn):
    """``fn`` run on real tensors, unseen by the tracer: a DeviceMesh built inside the traced rank
    function (``init_device_mesh`` in the rank's code, as DTensor programs do) is configuration,
    and building it reads its rank grid into Python, which fake tensors cannot do."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        from gg_notebook.capture.direct_trace import untraced

        with unset_fake_temporarily(), disable_proxy_modes_tracing(), untraced():
            return fn(*args, **kwargs)

    return call


def _trampoline(*args, **kwargs):
    # runs with the globals of the function whose code it replaces (torch.distributed.device_mesh)
    return _GG_OUTSIDE_TRACE["init_device_mesh"](*args, **kwargs)  # noqa: F821


@contextmanager
def _device_mesh_outside_trace() -> Iterator[None]:
    """DeviceMesh construction and slicing run on real tensors while a rank is traced. The user's
    code may hold ``init_device_mesh`` imported by name, so the function itself is redirected (its
    code object swapped for a trampoline; restored on exit), and DeviceMesh's methods are patched
    on the class."""
    import types

    import torch.distributed.device_mesh as dm

    fn = getattr(dm, "init_device_mesh", None)
    cls = getattr(dm, "DeviceMesh", None)
    if not isinstance(fn, types.FunctionType) or cls is None:
        yield
        return
    original_code = fn.__code__
    copy = types.FunctionType(original_code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    table = fn.__globals__.setdefault("_GG_OUTSIDE_TRACE", {})
    table["init_device_mesh"] = _outside_trace(copy)
    saved_methods = {}
    try:
        fn.__code__ = _trampoline.__code__
        for name in ("__init__", "__getitem__", "_flatten", "_unflatten", "_create_sub_mesh", "from_group"):
            raw = cls.__dict__.get(name)
            if isinstance(raw, types.FunctionType):
                saved_methods[name] = raw
                setattr(cls, name, _outside_trace(raw))
        yield
    finally:
        fn.__code__ = original_code
        for name, raw in saved_methods.items():
            setattr(cls, name, raw)


@contextmanager
def collective_shims() -> Iterator[None]:
    # Save the raw class attributes (pybind11 stores methods as descriptors in the class __dict__;
    # getattr would unwrap them and restoring that would lose the binding of self).
    saved: dict = {}
    missing = object()
    modules = (dist, dist.distributed_c10d)
    saved_fns = [(m, name, getattr(m, name)) for m in modules for name in _OBJECT_COLLECTIVES if hasattr(m, name)]
    saved_p2p = [(m, name, getattr(m, name)) for m in modules for name in _BLOCKING_P2P if hasattr(m, name)]
    saved_batch = [(m, name, getattr(m, name)) for m in modules for name in _BATCHED_P2P if hasattr(m, name)]
    mesh_ctx = _device_mesh_outside_trace()
    mesh_ctx.__enter__()
    try:
        for m, name, fn in saved_p2p:
            setattr(m, name, _blocking_p2p(fn))
        for m, name, fn in saved_batch:
            setattr(m, name, _batched_p2p(fn))
        for name, make in _SHIMS.items():
            orig = getattr(_PG, name, None)
            if orig is None:
                continue
            saved[name] = _PG.__dict__.get(name, missing)
            setattr(_PG, name, make(orig))
        for m, name, _ in saved_fns:
            setattr(m, name, _refuse_object_collective(name))
        yield
    finally:
        for name, raw in saved.items():
            if raw is missing:
                delattr(_PG, name)
            else:
                setattr(_PG, name, raw)
        for m, name, fn in saved_fns + saved_p2p + saved_batch:
            setattr(m, name, fn)
        mesh_ctx.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------------
# Decoding

_c10d = torch.ops.c10d
_fn = torch.ops._c10d_functional

_INPLACE = {
    _c10d.allreduce_.default: "all_reduce",
    _c10d.allgather_.default: "all_gather",
    _c10d._allgather_base_.default: "all_gather_into_tensor",
    _c10d._reduce_scatter_base_.default: "reduce_scatter_tensor",
    _c10d.alltoall_base_.default: "all_to_all_single",
    _c10d.broadcast_.default: "broadcast",
}
_FUNCTIONAL = {
    _fn.all_reduce.default: "all_reduce",
    _fn.all_gather_into_tensor.default: "all_gather_into_tensor",
    _fn.reduce_scatter_tensor.default: "reduce_scatter_tensor",
    _fn.all_to_all_single.default: "all_to_all_single",
    _fn.broadcast.default: "broadcast",
}
_BARRIER = {_c10d.barrier.default} if hasattr(_c10d, "barrier") else set()  # no result; still issued
_P2P = {_c10d.send.default: "send", _c10d.recv_.default: "recv"}


def _is_collective_namespace(target) -> bool:
    ns = getattr(target, "namespace", None)
    return ns in ("c10d", "_c10d_functional", "_c10d_functional_autograd")


def _torchbind(gm: fx.GraphModule, node) -> object:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return getattr(gm, node.target)
    return node


@dataclass(frozen=True)
class _Comm:
    name: str
    ranks: tuple[int, ...]
    label: str


def _comm_of_pg(obj) -> _Comm:
    pg = dist.ProcessGroup.unbox(obj) if isinstance(obj, torch.ScriptObject) else obj
    return _comm(pg.group_name, pg)


def _comm_of_name(name: str) -> _Comm:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _comm(str(name), _resolve_process_group(name))


def _comm(name: str, pg) -> _Comm:
    ranks = tuple(dist.get_process_group_ranks(pg))
    listed = ", ".join(str(r) for r in ranks)
    try:
        default = dist.distributed_c10d._get_default_group().group_name
    except Exception:  # pragma: no cover - no default group
        default = None
    if name == default:
        label = f"the default group (ranks {listed})"
    elif name in _GROUP_ORIGINS:
        label = f"the group created {_GROUP_ORIGINS[name]} (ranks {listed})"
    else:
        label = f"process group {name!r} (ranks {listed})"
    return _Comm(name, ranks, label)


# --------------------------------------------------------------------------------------------------
# Where process groups were created (for messages): group name -> "by `code` at file.py:LINE".

_GROUP_ORIGINS: dict[str, str] = {}


def _user_site() -> tuple[str, str] | None:
    """(file:line, code) of the innermost user frame on the Python stack (None outside user code)."""
    f = sys._getframe(1)
    while f is not None:
        if is_user_file(f.f_code.co_filename):
            import linecache

            text = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
            return format_source((f.f_code.co_filename, f.f_lineno, f.f_code.co_name, text)), text
        f = f.f_back
    return None


def _user_call_site() -> str | None:
    f = sys._getframe(2)
    while f is not None:
        if is_user_file(f.f_code.co_filename):
            import linecache

            text = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
            src = format_source((f.f_code.co_filename, f.f_lineno, f.f_code.co_name, text))
            return f"by `{text}` at {src}" if text else f"at {src}"
        f = f.f_back
    return None


@contextmanager
def record_group_origins() -> Iterator[None]:
    """Remember where the traced program creates process groups (``dist.new_group``, DeviceMesh)."""
    c10d = dist.distributed_c10d
    originals = {name: getattr(c10d, name) for name in ("_new_group_with_tag", "split_group") if hasattr(c10d, name)}

    def recording(orig):
        @functools.wraps(orig)
        def create(*args, **kwargs):
            pg = orig(*args, **kwargs)
            name = getattr(pg, "group_name", None)
            if isinstance(name, str) and name not in _GROUP_ORIGINS:
                site = _user_call_site()
                if site:
                    _GROUP_ORIGINS[name] = site
            return pg

        return create

    _GROUP_ORIGINS.clear()
    for name, orig in originals.items():
        setattr(c10d, name, recording(orig))
    try:
        yield
    finally:
        for name, orig in originals.items():
            setattr(c10d, name, orig)


def _reduce_op(obj) -> str:
    if isinstance(obj, str):
        return obj.lower()
    if isinstance(obj, torch.ScriptObject):
        return dist.ReduceOp.RedOpType(obj.op()).name.lower()
    if isinstance(obj, dist.ReduceOp):  # pragma: no cover
        return dist.ReduceOp.RedOpType(obj.op).name.lower()
    return str(obj).lower()


def _getitem_users(node: fx.Node, idx: int) -> list[fx.Node]:
    return [u for u in node.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == idx]


def _split(sizes) -> tuple[int, ...] | None:
    sizes = tuple(int(s) for s in sizes)
    return sizes or None


def _val(node) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _meta_from(src: fx.Node, dst: fx.Node) -> None:
    for k in ("gg_source", "gg_frames", "gg_source_kind", "gg_backward", "stack_trace", "seq_nr"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def rewrite_collectives(gm: fx.GraphModule, rank: int | None) -> list[fx.Node]:
    """Replace collectives by `collective_result` nodes (see module docstring); return them in order.

    Every collective issued (barriers too, which leave no node) is recorded in program order in
    ``gm.meta["gg_issued"]`` as ``(CollectiveInfo, source)``. Must run while the process group the
    graph was traced with is still alive.
    """
    g = gm.graph
    counters: dict[tuple[str, tuple[int, ...]], int] = defaultdict(int)
    issued: list[tuple[CollectiveInfo, str | None]] = []
    results: list[fx.Node] = []
    dead: list[fx.Node] = []

    def issue(comm: _Comm, kind: str, reduce_op: str | None = None, **extra) -> CollectiveInfo:
        """The next collective on ``comm`` in this rank's program order."""
        idx = counters[(comm.name, comm.ranks)]
        counters[(comm.name, comm.ranks)] += 1
        info = CollectiveInfo(kind, reduce_op, comm.ranks, idx, comm=comm.name, comm_label=comm.label, **extra)
        issued.append((info, node.meta.get("gg_source")))
        return info

    def make(before: fx.Node, inp: fx.Node, info: CollectiveInfo, val, replaces: list[fx.Node]) -> fx.Node:
        with g.inserting_before(before):
            r = g.call_function(collective_result, (inp,))
        r.meta["val"] = val
        if isinstance(val, torch.Tensor):
            from torch.fx.passes.shape_prop import _extract_tensor_metadata

            try:
                r.meta["tensor_meta"] = _extract_tensor_metadata(val)
            except Exception:  # pragma: no cover
                pass
        r.meta["gg_collective"] = info
        _meta_from(node, r)
        for old in replaces:
            old.replace_all_uses_with(r)
            dead.append(old)
        results.append(r)
        return r

    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if t in _BARRIER:
            issue(_comm_of_pg(_torchbind(gm, node.args[1])), "barrier")
            dead.append(node)
            continue
        if t in _INPLACE:
            kind = _INPLACE[t]
            a = node.args
            if kind == "all_reduce":
                tensors, pg, op = a[0], _torchbind(gm, a[1]), _torchbind(gm, a[2])
                info = issue(_comm_of_pg(pg), "all_reduce", _reduce_op(op))
                lists = _getitem_users(node, 0)
                for i, inp in enumerate(tensors):
                    outs = [u for l in lists for u in _getitem_users(l, i)]
                    make(node, inp, info, _val(inp), outs)
            elif kind == "broadcast":
                tensors, pg, root = a[0], _torchbind(gm, a[1]), a[2]
                comm = _comm_of_pg(pg)
                info = issue(comm, "broadcast", src=comm.ranks[root])
                lists = _getitem_users(node, 0)
                for i, inp in enumerate(tensors):
                    outs = [u for l in lists for u in _getitem_users(l, i)]
                    make(node, inp, info, _val(inp), outs)
            elif kind == "all_gather":
                out_lists, inputs, pg = a[0], a[1], _torchbind(gm, a[2])
                first = issue(_comm_of_pg(pg), "all_gather")
                top = _getitem_users(node, 0)
                for li, (lst, inp) in enumerate(zip(out_lists, inputs)):
                    mids = [u for x in top for u in _getitem_users(x, li)]
                    for j, buf in enumerate(lst):
                        outs = [u for m in mids for u in _getitem_users(m, j)]
                        info = dataclasses.replace(first, out_index=j)
                        make(node, inp, info, _val(buf), outs)
            elif kind in ("all_gather_into_tensor", "reduce_scatter_tensor"):
                out, inp, pg = a[0], a[1], _torchbind(gm, a[2])
                op = _reduce_op(_torchbind(gm, a[3])) if kind == "reduce_scatter_tensor" else None
                info = issue(_comm_of_pg(pg), kind, op)
                make(node, inp, info, _val(out), _getitem_users(node, 0))
            elif kind == "all_to_all_single":
                out, inp, pg, out_splits, in_splits = a[0], a[1], _torchbind(gm, a[2]), a[3], a[4]
                info = issue(_comm_of_pg(pg), kind, input_split_sizes=_split(in_splits),
                             output_split_sizes=_split(out_splits))
                r = make(node, inp, info, _val(out), [])
                # The op returns only a Work: later readers of the output buffer read the result.
                order = {n: i for i, n in enumerate(g.nodes)}
                for u in list(out.users):
                    if u is not node and u is not r and order[u] > order[node]:
                        u.replace_input_with(out, r)
            dead.append(node)
            continue
        if t in _P2P:
            kind = _P2P[t]
            tensors, pg, peer, tag = node.args[:4]
            comm = _comm_of_pg(_torchbind(gm, pg))
            where = node.meta.get("gg_source")
            who = "the sequential program" if rank is None else f"rank {rank}"
            if len(tensors) != 1:
                raise CaptureError(f"{who} {'sends' if kind == 'send' else 'receives'} {len(tensors)} tensors in one "
                                   f"call at {where}: send or receive one tensor per call.", rank=rank, source=where)
            if not 0 <= peer < len(comm.ranks):
                raise CaptureError(f"{who} calls {kind} with peer {peer} at {where}, outside {comm.label}.",
                                   rank=rank, source=where)
            me, other = rank, comm.ranks[peer]
            if me == other:
                raise CaptureError(f"{who} {'sends to' if kind == 'send' else 'receives from'} itself at {where}: a "
                                   "real process group refuses it; use the tensor directly.", rank=rank, source=where)
            src, dst = (me, other) if kind == "send" else (other, me)
            p2p = _Comm(f"{comm.name}/p2p", (src, dst), f"the transfers from rank {src} to rank {dst} on {comm.label}")
            info = issue(p2p, kind, blocking=bool(node.meta.get("gg_blocking", False)),
                         batch=node.meta.get("gg_p2p_batch"))
            buf = tensors[0]
            if kind == "send":
                make(node, buf, info, _val(buf), [])
            else:
                r = make(node, buf, info, _val(buf), [])
                # recv_ returns only a Work: later readers of the buffer read what was received
                order = {n: i for i, n in enumerate(g.nodes)}
                for u in list(buf.users):
                    if u is not node and u is not r and order[u] > order[node]:
                        u.replace_input_with(buf, r)
            dead.append(node)
            continue
        if t in _FUNCTIONAL:
            kind = _FUNCTIONAL[t]
            a = node.args
            inp = a[0]
            comm = _comm_of_name(a[-1])
            if kind in ("all_reduce", "reduce_scatter_tensor"):
                info = issue(comm, kind, _reduce_op(a[1]))
            elif kind == "all_to_all_single":
                info = issue(comm, kind, input_split_sizes=_split(a[2]), output_split_sizes=_split(a[1]))
            elif kind == "broadcast":
                info = issue(comm, kind, src=comm.ranks[a[1]])
            else:
                info = issue(comm, kind)
            waits = [u for u in node.users if u.target is _fn.wait_tensor.default]
            r = make(node, inp, info, _val(node), waits)
            node.replace_all_uses_with(r)
            dead.append(node)
            continue
        if t is _fn.wait_tensor.default:
            continue  # a wait on a non-collective tensor is an identity; handled below
        if _is_collective_namespace(t):
            raise CaptureError(
                f"{'the sequential program' if rank is None else f'rank {rank}'} uses the collective "
                f"{t} at {node.meta.get('gg_source')}, which gg_notebook does not support yet: use "
                "all_reduce, all_gather, all_gather_into_tensor, reduce_scatter / reduce_scatter_tensor, "
                "all_to_all / all_to_all_single, gather, scatter or broadcast (for dist.reduce: all_reduce).",
                rank=rank, source=node.meta.get("gg_source"),
            )

    # Remaining wait_tensor nodes (on already-rewritten results) are identities.
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is _fn.wait_tensor.default:
            node.replace_all_uses_with(node.args[0])
            dead.append(node)

    _erase_dead(g, dead)
    for n in list(g.nodes):  # ProcessGroup / ReduceOp torchbind attributes no longer used
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    gm.meta["gg_issued"] = issued
    return results  # no recompile: the caller interprets or finishes the graph


# --------------------------------------------------------------------------------------------------
# Carrying collective results through the functionalization replay. `collective_result` is a plain
# function that make_fx cannot trace, so while replaying it is the custom op below (one graph node,
# functional, whose fake kernel returns the recorded shape); `finish_collectives` turns it back.

_REPLAY_SHAPES: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}


# Tagged nondeterministic_seeded only so that make_fx never constant-folds it: a collective on a tensor
# built from Python numbers (``torch.tensor(float(n))``, no proxy) would otherwise run this placeholder
# eagerly (make_fx evaluates ops whose inputs are all small constants).
@torch.library.custom_op("gg_capture::collective", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _collective_op(x: torch.Tensor, key: int) -> torch.Tensor:
    raise RuntimeError("gg_capture::collective is a tracing placeholder and cannot run")


@_collective_op.register_fake
def _(x, key):
    shape, dtype = _REPLAY_SHAPES[key]
    return x.new_empty(shape, dtype=dtype)


def replay_collective(node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """Called by the replaying interpreter in place of a `collective_result` node."""
    key = len(_REPLAY_SHAPES)
    v = node.meta["val"]
    _REPLAY_SHAPES[key] = (tuple(v.shape), v.dtype)
    return torch.ops.gg_capture.collective(x, key)


def clear_replay() -> None:
    _REPLAY_SHAPES.clear()


def finish_collectives(gm: fx.GraphModule) -> list[fx.Node]:
    """After the replay: restore `collective_result` nodes, fold shim nodes, remove dead code."""
    g = gm.graph
    results = []
    for n in g.nodes:
        if n.op == "call_function" and n.target is torch.ops.gg_capture.collective.default:
            n.target = collective_result
            n.args = (n.args[0],)
            try:
                n._rename("collective_result")
            except Exception:  # pragma: no cover - private fx API; names are cosmetic
                pass
            results.append(n)
        elif n.op == "call_function" and n.target is collective_result:
            results.append(n)  # a graph that was not replayed (one pass: tracing._mutation_free)
    _simplify_shims(g)
    _dce(g)
    return results


def _erase_dead(g: fx.Graph, dead: list[fx.Node]) -> None:
    """Erase the replaced plumbing (and whatever only it used) in reverse order."""
    pending = list(dead)
    seen = set()
    while pending:
        progress = False
        for n in list(pending):
            if n in seen:
                pending.remove(n)
                continue
            users = [u for u in n.users]
            if not users:
                g.erase_node(n)
                seen.add(n)
                pending.remove(n)
                progress = True
            elif all(u.op == "call_function" and u.target is operator.getitem for u in users):
                pending.extend(u for u in users if u not in pending)
        if not progress:
            break


def _same_layout(a, b) -> bool:
    return (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    )


def _simplify_shims(g: fx.Graph) -> None:
    """Fold the shim's clone (feeding a collective) and same-shape copy (writing its result back)."""
    for n in list(g.nodes):
        if n.op != "call_function" or not n.meta.get("gg_shim"):
            continue
        if n.target is torch.ops.aten.clone.default and all(u.target is collective_result for u in n.users):
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
        elif n.target is torch.ops.aten.copy.default:
            dst, src = n.args[0], n.args[1]
            if isinstance(src, fx.Node) and src.target is collective_result and _same_layout(_val(dst), _val(src)):
                n.replace_all_uses_with(src)
                g.erase_node(n)


def _dce(g: fx.Graph) -> None:
    def impure(n: fx.Node) -> bool:
        if n.op in ("placeholder", "output"):
            return True
        if n.op == "call_function" and n.target is collective_result:
            return True  # every rank must issue it, even if the result is unused
        return n.is_impure()

    g.eliminate_dead_code(is_impure_node=impure)
    # torchbind attributes (ProcessGroup / ReduceOp) no longer used
    for n in list(g.nodes):
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)


# --------------------------------------------------------------------------------------------------
# Cross-rank matching (on plain data: the graphs may have been captured in other processes)


def _shape_of(v) -> Shape:
    return (tuple(int(s) for s in v.shape), v.dtype) if isinstance(v, torch.Tensor) else None


def issued_collectives(issued: list[tuple[CollectiveInfo, str | None]], results: list[fx.Node],
                       rank: int | None) -> list[IssuedCollective]:
    """This rank's collectives in program order (``issued``: `rewrite_collectives`' record), each
    with its result nodes in the final graph (``results``: `finish_collectives`' list)."""
    by_key: dict[tuple, list[fx.Node]] = defaultdict(list)
    for n in results:
        by_key[n.meta["gg_collective"].key].append(n)
    out = []
    for info, source in issued:
        nodes = by_key.get(info.key, [])
        out.append(IssuedCollective(
            rank=-1 if rank is None else rank, info=info, source=source,
            nodes=tuple(n.name for n in nodes),
            inputs=tuple(_shape_of(_val(n.args[0]) if n.args else None) for n in nodes),
            outputs=tuple(_shape_of(_val(n)) for n in nodes),
        ))
    return out


def _on(c: IssuedCollective) -> str:
    return f"collective #{c.info.index} on {c.info.where()}"


def match_collectives(per_rank: list[list[IssuedCollective]]) -> list[MatchedCollective]:
    """Line up every rank's collectives by (communicator, index); raise `CaptureError` on any
    disagreement, including an issue order that deadlocks (see `check_issue_order`)."""
    # communicator -> rank -> index -> call
    table: dict[tuple, dict[int, dict[int, IssuedCollective]]] = defaultdict(lambda: defaultdict(dict))
    for rank, calls in enumerate(per_rank):
        for c in calls:
            table[c.info.communicator][rank][c.info.index] = c

    matched: list[MatchedCollective] = []
    for (comm, group), by_rank in table.items():
        counts = {r: len(by_rank.get(r, {})) for r in group}
        n_max = max(counts.values())
        for idx in range(n_max):
            present = {r: by_rank[r][idx] for r in group if idx in by_rank.get(r, {})}
            missing = [r for r in group if r not in present]
            if missing and group and present and next(iter(present.values())).info.p2p:
                r_has = next(iter(present))
                first = present[r_has]
                src, dst = group
                if first.info.kind == "send":
                    what = (f"rank {src} sends a tensor to rank {dst} at {first.source} (transfer #{idx} from {src} to "
                            f"{dst}), but rank {dst} receives only {counts[dst]} from rank {src}")
                else:
                    what = (f"rank {dst} receives a tensor from rank {src} at {first.source} (transfer #{idx} from "
                            f"{src} to {dst}), but rank {src} sends only {counts[src]} to rank {dst}")
                raise CaptureError(
                    f"{what}: every send needs its recv on the peer (matched in order per pair of ranks and "
                    "process group); in a real run this hangs.", rank=r_has, source=first.source)
            if missing:
                r_has = next(iter(present))
                r_miss = missing[0]
                first = present[r_has]
                raise CaptureError(
                    f"rank {r_has} calls {first.info.describe()} at {first.source} as {_on(first)}, "
                    f"but rank {r_miss} issues only {counts[r_miss]} collectives on that group (rank {r_has} "
                    f"issues {counts[r_has]}): the ranks' collectives must line up (in a real run this "
                    "deadlocks). Make every rank of the group call the same collectives in the same order.",
                    rank=r_has, source=first.source,
                )
            ref_rank = group[0]
            ref = present[ref_rank]
            if ref.info.p2p:
                _check_p2p(group, idx, present)
                matched.append(MatchedCollective(group, idx, "p2p", None, {r: c.nodes[0] for r, c in present.items()},
                                                 comm=comm, comm_label=ref.info.where()))
                continue
            for r in group[1:]:
                other = present[r]
                problem = None
                if (other.info.kind, other.info.reduce_op) != (ref.info.kind, ref.info.reduce_op):
                    problem = "different collectives"
                elif other.info.kind == "broadcast" and other.info.src != ref.info.src:
                    problem = f"broadcast from rank {other.info.src} vs from rank {ref.info.src}"
                elif other.info.kind in ("all_to_all_single", "barrier"):
                    problem = None
                elif other.inputs[:1] != ref.inputs[:1] or len(other.nodes) != len(ref.nodes):
                    problem = f"input shapes {other.inputs[0] if other.inputs else None} vs " \
                              f"{ref.inputs[0] if ref.inputs else None}"
                if problem:
                    raise CaptureError(
                        f"rank {r} calls {other.info.describe()} at {other.source} where rank {ref_rank} calls "
                        f"{ref.info.describe()} at {ref.source} ({_on(other)}; {problem}): the ranks' "
                        "collectives must line up (in a real run this deadlocks or corrupts data).",
                        rank=r, source=other.source,
                    )
            if ref.info.kind == "barrier":
                continue  # no result: matters only for the issue order
            if ref.info.kind == "all_to_all_single":
                _check_all_to_all(group, idx, present)
            nodes = {r: (c.nodes if ref.info.kind == "all_gather" else c.nodes[0]) for r, c in present.items()}
            matched.append(MatchedCollective(group, idx, ref.info.kind, ref.info.reduce_op, nodes,
                                             comm=comm, comm_label=ref.info.where()))
    check_issue_order(per_rank)
    return matched


def check_issue_order(per_rank: list[list[IssuedCollective]]) -> None:
    """Every collective blocks until all members of its communicator have issued it: run the ranks'
    collective sequences under that rule and raise `CaptureError` if they deadlock (e.g. two ranks
    issuing collectives on two process groups over the same ranks in opposite orders)."""
    pos = [0] * len(per_rank)

    def at(r: int) -> IssuedCollective | None:
        return per_rank[r][pos[r]] if pos[r] < len(per_rank[r]) else None

    # point-to-point: the transfers each rank has reached (posted, or waiting in)
    reached: set[tuple[int, tuple]] = set()

    def peer_of(c: IssuedCollective, r: int) -> int:
        src, dst = c.info.group
        return dst if r == src else src

    progressed = True
    while progressed:
        progressed = False
        for r in range(len(per_rank)):
            c = at(r)
            if c is None:
                continue
            if c.info.p2p:
                # isend/irecv only post; send/recv wait until the peer has reached its side
                reached.add((r, c.info.key))
                if not c.info.blocking or (peer_of(c, r), c.info.key) in reached:
                    pos[r] += 1
                    progressed = True
                continue
            members = c.info.group
            if all((m_at := at(m)) is not None and m_at.info.key == c.info.key for m in members):
                for m in members:
                    pos[m] += 1
                progressed = True
    waiting = [r for r in range(len(per_rank)) if at(r) is not None]
    if not waiting:
        return
    r = waiting[0]
    c = at(r)
    if c.info.p2p:
        m = peer_of(c, r)
        other = at(m)
        then = (f"rank {m} has finished" if other is None else
                f"rank {m} first waits in {other.info.describe()} at {other.source}")
        raise CaptureError(
            f"the ranks deadlock: rank {r} waits in a blocking {c.info.kind} at {c.source} ({c.info.where()}) "
            f"that rank {m} has not reached: {then}. dist.send/dist.recv wait for their peer; post both directions "
            "with dist.isend/dist.irecv (or dist.batch_isend_irecv) and wait afterwards, or order the calls so "
            "that one rank sends while the other receives (with NCCL this hangs; gloo and MPI may buffer a small "
            "blocking send and return early, so a small test run can pass and the same code hang at scale).",
            rank=r, source=c.source)
    m = next(m for m in c.info.group if at(m) is None or at(m).info.key != c.info.key)
    other = at(m)
    then = (f"rank {m} has finished its collectives" if other is None else
            f"rank {m} first waits in {other.info.describe()} at {other.source}, {_on(other)}")
    raise CaptureError(
        f"the ranks' collectives deadlock: rank {r} waits in {c.info.describe()} at {c.source}, {_on(c)}, "
        f"which rank {m} has not issued yet: {then}. A collective completes only when every member of "
        "its process group has issued it, and collectives on different process groups never match each "
        "other (even over the same ranks), so the ranks must issue them in one consistent order (in a real "
        "run this hangs).",
        rank=r, source=c.source,
    )


def _check_p2p(group, idx, present: dict[int, IssuedCollective]) -> None:
    """A transfer: the source's call is a send, the destination's a recv of the same shape and dtype."""
    src, dst = group
    s, d = present[src], present[dst]
    if s.info.kind != "send" or d.info.kind != "recv":  # pragma: no cover - the pair key orders them
        raise CaptureError(f"transfer #{idx} from rank {src} to rank {dst} is not a send matched by a recv.",
                           rank=src, source=s.source)
    sent, room = s.inputs[0], d.outputs[0]
    if sent != room:
        raise CaptureError(
            f"rank {src} sends a {_describe_shape(sent)} tensor to rank {dst} at {s.source} (transfer #{idx} from "
            f"{src} to {dst}) but rank {dst} receives it into a {_describe_shape(room)} buffer at {d.source}: the "
            "shapes and dtypes must agree (a real run fails or corrupts data).", rank=dst, source=d.source)


def _describe_shape(sh: Shape) -> str:
    if sh is None:
        return "?"
    shape, dtype = sh
    return f"{list(shape)} {str(dtype).replace('torch.', '')}"


def _check_all_to_all(group, idx, present: dict[int, IssuedCollective]) -> None:
    W = len(group)
    sends = {}
    recvs = {}
    for gi, r in enumerate(group):
        c = present[r]
        info = c.info
        (ishape, idtype), (oshape, odtype) = c.inputs[0], c.outputs[0]
        if ishape[1:] != oshape[1:] or idtype != odtype:
            raise CaptureError(
                f"rank {r} calls all_to_all_single at {c.source} with input {ishape} "
                f"and output {oshape}: they must agree beyond dim 0 ({_on(c)}).",
                rank=r, source=c.source,
            )
        ins = info.input_split_sizes or ((ishape[0] // W,) * W if ishape[0] % W == 0 else None)
        outs = info.output_split_sizes or ((oshape[0] // W,) * W if oshape[0] % W == 0 else None)
        if ins is None or outs is None or len(ins) != W or len(outs) != W:
            raise CaptureError(
                f"rank {r} calls all_to_all_single at {c.source} with sizes that do not split "
                f"into {W} parts ({_on(c)}).",
                rank=r, source=c.source,
            )
        sends[gi], recvs[gi] = ins, outs
    for i, ri in enumerate(group):
        for j, rj in enumerate(group):
            if sends[i][j] != recvs[j][i]:
                c = present[rj]
                raise CaptureError(
                    f"rank {ri} sends {sends[i][j]} rows to rank {rj} in all_to_all_single at "
                    f"{present[ri].source} but rank {rj} expects {recvs[j][i]} at "
                    f"{c.source} ({_on(c)}): the split sizes must agree.",
                    rank=rj, source=c.source,
                )
