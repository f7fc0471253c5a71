"""Collectives: value-semantics shims while tracing, graph rewriting to `collective_result`, matching.

After `rewrite_collectives`, every tensor a collective produces is one node
``call_function[target=collective_result](input_node)`` whose ``meta["gg_collective"]`` is a
`CollectiveInfo` and ``meta["val"]`` the result's fake tensor. The c10d / _c10d_functional ops,
their getitem / wait_tensor plumbing and the ProcessGroup / ReduceOp torchbind attributes are gone.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.fx as fx

from gg_notebook.capture.errors import CaptureError
from gg_notebook.capture.source import extra_node_meta


def collective_result(*inputs):
    """Graph marker for one tensor produced by a collective; never executed."""
    raise RuntimeError(
        "collective_result is a graph marker for a collective's result; it cannot be executed. "
        "Interpret it with node.meta['gg_collective']."
    )


@dataclass(frozen=True)
class CollectiveInfo:
    kind: str  # all_reduce | all_gather | all_gather_into_tensor | reduce_scatter_tensor | all_to_all_single | broadcast
    reduce_op: str | None  # sum | max | min | avg | product (reductions), else None
    group: tuple[int, ...]  # global ranks of the group, in group order
    index: int  # program order among this rank's collectives on this group
    out_index: int = 0  # list all_gather: whose tensor this node is (group order)
    input_split_sizes: tuple[int, ...] | None = None
    output_split_sizes: tuple[int, ...] | None = None
    src: int | None = None  # broadcast source (global rank)

    def describe(self) -> str:
        return f"{self.kind}({self.reduce_op})" if self.reduce_op else self.kind


@dataclass
class MatchedCollective:
    """One collective as issued by every member of ``group``: ``nodes[rank]`` is the result node name
    in that rank's graph (a tuple of names, in group order, for the list all_gather)."""

    group: tuple[int, ...]
    index: int
    kind: str
    reduce_op: str | None
    nodes: dict[int, str | tuple[str, ...]]


# --------------------------------------------------------------------------------------------------
# Shims: the in-place dist API writes into the caller's tensors. Functionalization does not see those
# writes when the tensor is a view (e.g. ``dist.all_reduce(buf[:n])``, ``all_gather(list(out.chunk(W)))``)
# and all_to_all's write is never visible (its op returns only a Work). So while tracing, each
# ProcessGroup method runs the real op on fresh buffers and copies the result back with ``copy_``,
# which functionalization handles (including views). Nodes created by the shim carry
# meta["gg_shim"] and are simplified away by `rewrite_collectives`.

_PG = torch._C._distributed_c10d.ProcessGroup


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _shim_inplace_list(orig):
    """For methods ``(tensors, *rest)`` that write their result into ``tensors`` (allreduce,
    broadcast): run on fresh copies, then copy back, so functionalization sees the writes."""

    def method(self, tensors, *args, **kwargs):
        if not isinstance(tensors, (list, tuple)):
            return orig(self, tensors, *args, **kwargs)
        with extra_node_meta(gg_shim=True):
            tmps = [t.clone(memory_format=torch.contiguous_format) for t in tensors]
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


_SHIMS = {
    "allreduce": _shim_inplace_list,
    "broadcast": _shim_inplace_list,
    "allgather": _shim_allgather,
    "all_gather_single": _shim_single_output,
    "_allgather_base": _shim_single_output,
    "reduce_scatter_single": _shim_single_output,
    "_reduce_scatter_base": _shim_single_output,
    "all_to_all_single": _shim_single_output,
    "alltoall_base": _shim_single_output,
}


@contextmanager
def collective_shims() -> Iterator[None]:
    # Save the raw class attributes (pybind11 stores methods as descriptors in the class __dict__;
    # getattr would unwrap them and restoring that would lose the binding of self).
    saved: dict = {}
    missing = object()
    try:
        for name, make in _SHIMS.items():
            orig = getattr(_PG, name, None)
            if orig is None:
                continue
            saved[name] = _PG.__dict__.get(name, missing)
            setattr(_PG, name, make(orig))
        yield
    finally:
        for name, raw in saved.items():
            if raw is missing:
                delattr(_PG, name)
            else:
                setattr(_PG, name, raw)


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
_DROPPABLE = {_c10d.barrier.default} if hasattr(_c10d, "barrier") else set()


def _is_collective_namespace(target) -> bool:
    ns = getattr(target, "namespace", None)
    return ns in ("c10d", "_c10d_functional", "_c10d_functional_autograd")


def _torchbind(gm: fx.GraphModule, node) -> object:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return getattr(gm, node.target)
    return node


def _group_of_pg(obj) -> tuple[int, ...]:
    pg = dist.ProcessGroup.unbox(obj) if isinstance(obj, torch.ScriptObject) else obj
    return tuple(dist.get_process_group_ranks(pg))


def _group_of_name(name: str) -> tuple[int, ...]:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return tuple(dist.get_process_group_ranks(_resolve_process_group(name)))


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

    Must run while the process group the graph was traced with is still alive.
    """
    g = gm.graph
    counters: dict[tuple[int, ...], int] = defaultdict(int)
    results: list[fx.Node] = []
    dead: list[fx.Node] = []

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
        if t in _DROPPABLE:
            dead.append(node)
            continue
        if t in _INPLACE:
            kind = _INPLACE[t]
            a = node.args
            if kind == "all_reduce":
                tensors, pg, op = a[0], _torchbind(gm, a[1]), _torchbind(gm, a[2])
                group = _group_of_pg(pg)
                idx = counters[group]
                counters[group] += 1
                info = CollectiveInfo("all_reduce", _reduce_op(op), group, idx)
                lists = _getitem_users(node, 0)
                for i, inp in enumerate(tensors):
                    outs = [u for l in lists for u in _getitem_users(l, i)]
                    make(node, inp, info, _val(inp), outs)
            elif kind == "broadcast":
                tensors, pg, root = a[0], _torchbind(gm, a[1]), a[2]
                group = _group_of_pg(pg)
                idx = counters[group]
                counters[group] += 1
                info = CollectiveInfo("broadcast", None, group, idx, src=group[root])
                lists = _getitem_users(node, 0)
                for i, inp in enumerate(tensors):
                    outs = [u for l in lists for u in _getitem_users(l, i)]
                    make(node, inp, info, _val(inp), outs)
            elif kind == "all_gather":
                out_lists, inputs, pg = a[0], a[1], _torchbind(gm, a[2])
                group = _group_of_pg(pg)
                idx = counters[group]
                counters[group] += 1
                top = _getitem_users(node, 0)
                for li, (lst, inp) in enumerate(zip(out_lists, inputs)):
                    mids = [u for x in top for u in _getitem_users(x, li)]
                    for j, buf in enumerate(lst):
                        outs = [u for m in mids for u in _getitem_users(m, j)]
                        info = CollectiveInfo("all_gather", None, group, idx, out_index=j)
                        make(node, inp, info, _val(buf), outs)
            elif kind in ("all_gather_into_tensor", "reduce_scatter_tensor"):
                out, inp, pg = a[0], a[1], _torchbind(gm, a[2])
                group = _group_of_pg(pg)
                idx = counters[group]
                counters[group] += 1
                op = _reduce_op(_torchbind(gm, a[3])) if kind == "reduce_scatter_tensor" else None
                info = CollectiveInfo(kind, op, group, idx)
                make(node, inp, info, _val(out), _getitem_users(node, 0))
            elif kind == "all_to_all_single":
                out, inp, pg, out_splits, in_splits = a[0], a[1], _torchbind(gm, a[2]), a[3], a[4]
                group = _group_of_pg(pg)
                idx = counters[group]
                counters[group] += 1
                info = CollectiveInfo(kind, None, group, idx, input_split_sizes=_split(in_splits),
                                      output_split_sizes=_split(out_splits))
                r = make(node, inp, info, _val(out), [])
                # The op returns only a Work: later readers of the output buffer read the result.
                order = {n: i for i, n in enumerate(g.nodes)}
                for u in list(out.users):
                    if u is not node and u is not r and order[u] > order[node]:
                        u.replace_input_with(out, r)
            dead.append(node)
            continue
        if t in _FUNCTIONAL:
            kind = _FUNCTIONAL[t]
            a = node.args
            inp = a[0]
            group = _group_of_name(a[-1])
            idx = counters[group]
            counters[group] += 1
            if kind == "all_reduce":
                info = CollectiveInfo(kind, _reduce_op(a[1]), group, idx)
            elif kind == "reduce_scatter_tensor":
                info = CollectiveInfo(kind, _reduce_op(a[1]), group, idx)
            elif kind == "all_to_all_single":
                info = CollectiveInfo(kind, None, group, idx, input_split_sizes=_split(a[2]),
                                      output_split_sizes=_split(a[1]))
            elif kind == "broadcast":
                info = CollectiveInfo(kind, None, group, idx, src=group[a[1]])
            else:
                info = CollectiveInfo(kind, None, group, idx)
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
                "all_reduce, all_gather, all_gather_into_tensor, reduce_scatter_tensor, "
                "all_to_all_single or broadcast.",
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
    return results  # no recompile: the caller interprets or finishes the graph


# --------------------------------------------------------------------------------------------------
# Carrying collective results through the functionalization replay. `collective_result` is a plain
# function that make_fx cannot trace, so while replaying it is the custom op below (one graph node,
# functional, whose fake kernel returns the recorded shape); `finish_collectives` turns it back.

_REPLAY_SHAPES: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}


@torch.library.custom_op("gg_capture::collective", mutates_args=())
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
# Cross-rank matching


def _describe(node: fx.Node) -> str:
    return node.meta["gg_collective"].describe()


def _shape(node: fx.Node):
    v = _val(node.args[0]) if node.args else None
    return (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None


def match_collectives(per_rank: list[list[fx.Node]]) -> list[MatchedCollective]:
    """Line up every rank's collectives by (group, index); raise `CaptureError` on any disagreement."""
    # (group, index) -> rank -> nodes
    table: dict[tuple[int, ...], dict[int, dict[int, list[fx.Node]]]] = defaultdict(lambda: defaultdict(dict))
    for rank, nodes in enumerate(per_rank):
        for n in nodes:
            info: CollectiveInfo = n.meta["gg_collective"]
            table[info.group][rank].setdefault(info.index, []).append(n)

    matched: list[MatchedCollective] = []
    for group, by_rank in table.items():
        counts = {r: len(by_rank.get(r, {})) for r in group}
        n_max = max(counts.values())
        for idx in range(n_max):
            present = {r: by_rank[r][idx] for r in group if idx in by_rank.get(r, {})}
            missing = [r for r in group if r not in present]
            if missing:
                r_has = next(iter(present))
                r_miss = missing[0]
                first = present[r_has][0]
                raise CaptureError(
                    f"rank {r_has} calls {_describe(first)} at {first.meta.get('gg_source')} as collective "
                    f"#{idx} on group {group}, but rank {r_miss} issues only {counts[r_miss]} collectives on "
                    f"that group (rank {r_has} issues {counts[r_has]}): the ranks' collectives must line up "
                    "(in a real run this deadlocks). Make every rank of the group call the same collectives "
                    "in the same order.",
                    rank=r_has, source=first.meta.get("gg_source"),
                )
            ref_rank = group[0]
            ref = present[ref_rank]
            ref_info: CollectiveInfo = ref[0].meta["gg_collective"]
            for r in group[1:]:
                other = present[r]
                info: CollectiveInfo = other[0].meta["gg_collective"]
                problem = None
                if (info.kind, info.reduce_op) != (ref_info.kind, ref_info.reduce_op):
                    problem = "different collectives"
                elif info.kind == "broadcast" and info.src != ref_info.src:
                    problem = f"broadcast from rank {info.src} vs from rank {ref_info.src}"
                elif info.kind == "all_to_all_single":
                    problem = None
                elif _shape(other[0]) != _shape(ref[0]) or len(other) != len(ref):
                    problem = f"input shapes {_shape(other[0])} vs {_shape(ref[0])}"
                if problem:
                    raise CaptureError(
                        f"rank {r} calls {info.describe()} at {other[0].meta.get('gg_source')} where rank "
                        f"{ref_rank} calls {ref_info.describe()} at {ref[0].meta.get('gg_source')} "
                        f"(collective #{idx} on group {group}; {problem}): the ranks' collectives must "
                        "line up (in a real run this deadlocks or corrupts data).",
                        rank=r, source=other[0].meta.get("gg_source"),
                    )
            if ref_info.kind == "all_to_all_single":
                _check_all_to_all(group, idx, present)
            nodes = {
                r: (tuple(n.name for n in ns) if ref_info.kind == "all_gather" else ns[0].name)
                for r, ns in present.items()
            }
            matched.append(MatchedCollective(group, idx, ref_info.kind, ref_info.reduce_op, nodes))
    return matched


def _check_all_to_all(group, idx, present) -> None:
    W = len(group)
    sends = {}
    recvs = {}
    for gi, r in enumerate(group):
        n = present[r][0]
        info: CollectiveInfo = n.meta["gg_collective"]
        inp, out = _val(n.args[0]), _val(n)
        if inp.shape[1:] != out.shape[1:] or inp.dtype != out.dtype:
            raise CaptureError(
                f"rank {r} calls all_to_all_single at {n.meta.get('gg_source')} with input {tuple(inp.shape)} "
                f"and output {tuple(out.shape)}: they must agree beyond dim 0 (collective #{idx} on group {group}).",
                rank=r, source=n.meta.get("gg_source"),
            )
        ins = info.input_split_sizes or ((inp.shape[0] // W,) * W if inp.shape[0] % W == 0 else None)
        outs = info.output_split_sizes or ((out.shape[0] // W,) * W if out.shape[0] % W == 0 else None)
        if ins is None or outs is None or len(ins) != W or len(outs) != W:
            raise CaptureError(
                f"rank {r} calls all_to_all_single at {n.meta.get('gg_source')} with sizes that do not split "
                f"into {W} parts (collective #{idx} on group {group}).",
                rank=r, source=n.meta.get("gg_source"),
            )
        sends[gi], recvs[gi] = ins, outs
    for i, ri in enumerate(group):
        for j, rj in enumerate(group):
            if sends[i][j] != recvs[j][i]:
                n = present[rj][0]
                raise CaptureError(
                    f"rank {ri} sends {sends[i][j]} rows to rank {rj} in all_to_all_single at "
                    f"{present[ri][0].meta.get('gg_source')} but rank {rj} expects {recvs[j][i]} at "
                    f"{n.meta.get('gg_source')} (collective #{idx} on group {group}): the split sizes must agree.",
                    rank=rj, source=n.meta.get("gg_source"),
                )
