"""Serialize IR graphs (and whatever travels with them) to bytes and back, by value.

Used to bring each rank's lowered `Graph` back from the process that captured it. Plain pickle
almost works; what it cannot do is handled here:

* ATen operators (`torch._ops.OpOverload`, `OpOverloadPacket`, `HigherOrderOperator`) are pybind
  objects that do not pickle: they travel as their qualified name ("aten::mm" + "default") and
  are looked up in ``torch.ops`` on load (custom ops registered at import time exist on both sides).
* A `Graph` travels as its nodes in topological order followed by its inputs and outputs, so
  every node's inputs are already in the pickle memo when the node is written: the recursion depth
  stays constant however long the graph's dependency chains are.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Any

import torch

from gg_notebook.frozen import frozen
from gg_notebook.ir.graph import Graph


def _load_overload(qualified_name: str, overload: str):
    return getattr(_load_packet(qualified_name), overload)


def _load_packet(qualified_name: str):
    namespace, name = qualified_name.split("::", 1)
    return getattr(getattr(torch.ops, namespace), name)


def _load_higher_order(name: str):
    return getattr(torch.ops.higher_order, name)


def _load_graph(nodes, inputs, outputs, rank, extra=None):
    g = Graph(nodes, inputs, outputs, rank=rank)
    for k, v in (extra or {}).items():  # every other field (random_ops, ...) as it was
        setattr(g, k, v)
    return g


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any):
        if isinstance(obj, torch._ops.OpOverload):
            return _load_overload, (obj._schema.name, obj._overloadname)
        if isinstance(obj, torch._ops.OpOverloadPacket):
            return _load_packet, (obj._qualified_op_name,)
        if isinstance(obj, torch._ops.HigherOrderOperator):
            return _load_higher_order, (obj.name(),)
        if type(obj) is Graph:
            _check_topological(obj)
            extra = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                     if f.name not in ("nodes", "inputs", "outputs", "rank", "by_name")}
            return _load_graph, (list(obj.nodes), list(obj.inputs), list(obj.outputs), obj.rank, extra)
        return NotImplemented


def _check_topological(g: Graph) -> None:
    seen: set[int] = set()
    for n in g.nodes:
        for i in n.inputs:
            if id(i) not in seen:
                raise ValueError(f"graph of rank {g.rank} is not in topological order: {n.name} uses "
                                 f"{i.name} before it is defined")
        seen.add(id(n))


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` (graphs, operators, tensors, plain data) to bytes."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    """The inverse of `dumps` (operators are resolved in this process's ``torch.ops``). The heap
    that exists is frozen first (`gg_notebook.frozen`): unpickling a rank's graph makes hundreds of
    thousands of tracked objects, and each full collection on the way would rescan everything that
    exists (loading 7 derived ranks of a 126-layer 405B-shaped fwd+bwd: 3.2-4.1 -> 1.1-1.4 CPU s; the
    index built from them after: unchanged). The young collections still run."""
    with frozen():
        return pickle.loads(data)



