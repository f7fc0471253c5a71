"""`capture.forked` (calls in fresh forked processes) and `ir.serialize` (IR graphs by value)."""

import sys

import pytest
import torch

from gg_notebook.capture import CaptureError
from gg_notebook.capture.forked import (ChildDied, Interim, RemoteTraceback, ResultNotSent, fork_available, hand_over,
                                       run_forked)
from gg_notebook.ir import serialize
from gg_notebook.ir.graph import Graph, Node
from gg_notebook.ir.specs import ew_spec, reduce_spec

needs_fork = pytest.mark.skipif(not fork_available(), reason="needs fork")

counter = 0


def bump(k):
    global counter
    counter += 1
    return k, counter


@needs_fork
def test_each_call_runs_in_a_fresh_copy_of_this_process():
    assert run_forked(bump, [3, 1, 2], workers=2) == [(3, 1), (1, 1), (2, 1)]
    assert counter == 0


def hands_over_then_returns(k):
    if k < 10:
        assert hand_over(("early", k))
    return ("done", k)


@needs_fork
def test_a_value_handed_over_reaches_then_before_the_result_and_may_schedule_work():
    seen = []

    def then(i, res):
        seen.append((i, res.value if isinstance(res, Interim) else res))
        if isinstance(res, Interim) and res.value[1] < 2:
            return [10 + res.value[1]]  # work started from the early value, while the child runs on
        return []

    out = run_forked(hands_over_then_returns, [0, 1, 2], workers=2, then=then)
    assert out == [("done", 0), ("done", 1), ("done", 2), ("done", 10), ("done", 11)]
    for k in (0, 1, 2):
        assert seen.index((k, ("early", k))) < seen.index((k, ("done", k))), seen
    assert (3, ("done", 10)) in seen and (4, ("done", 11)) in seen
    assert not hand_over("outside a child")  # nothing to send to


def fail_on_odd(k):
    if k % 2:
        raise CaptureError(f"odd {k}", rank=k, source="model.py:7")
    return k


@needs_fork
def test_the_first_failing_call_raises_with_its_type_and_attributes():
    with pytest.raises(CaptureError) as ei:
        run_forked(fail_on_odd, [0, 2, 3, 4, 5], workers=2)
    e = ei.value
    assert str(e) == "odd 3" and e.rank == 3 and e.source == "model.py:7"
    assert isinstance(e.__cause__, RemoteTraceback) and "fail_on_odd" in str(e.__cause__)


def local_class_error(k):
    class Odd(Exception):
        pass

    raise Odd(f"local {k}")


def unpicklable(k):
    return lambda: k


def exits(k):
    import os

    if k:
        os._exit(k)
    return k


@needs_fork
def test_unusual_failures():
    with pytest.raises(RuntimeError, match=r"local_class_error.<locals>.Odd: local 1"):
        run_forked(local_class_error, [1], workers=1)
    with pytest.raises(ResultNotSent, match="could not be sent back") as ei:
        run_forked(unpicklable, [5], workers=1)
    assert ei.value.item == 5
    with pytest.raises(ChildDied) as ei:
        run_forked(exits, [0, 7], workers=2)
    assert ei.value.index == 1 and ei.value.how == "exited with code 7 without sending its result"


def test_graph_roundtrip_resolves_operators_and_survives_long_chains():
    x = Node("x", "input", 0, (), (3,), torch.float32, rank=1)
    nodes = [x]
    relu = ew_spec(torch.ops.aten.relu.default, 1)
    for i in range(20000):  # far deeper than the recursion limit
        nodes.append(Node(f"n{i}", "call", relu, (nodes[-1],), (3,), torch.float32, target="aten.relu.default", rank=1))
    total = reduce_spec("sum", (0,), False)
    nodes.append(Node("s", "call", total, (nodes[-1],), (), torch.float32, rank=1))
    g = Graph(nodes, [x], [nodes[-1]], rank=1)
    assert len(nodes) > sys.getrecursionlimit()
    h = serialize.loads(serialize.dumps(g))
    assert isinstance(h, Graph) and h.rank == 1 and len(h.nodes) == len(nodes)
    assert h.nodes[5].attrs.target is torch.ops.aten.relu.default
    assert h.nodes[-1].attrs.target is torch.ops.aten.sum.dim_IntList
    assert h.nodes[5].attrs == relu and h.nodes[-1].attrs == total
    assert h.by_name["n7"].inputs[0] is h.by_name["n6"] and h.outputs[0] is h.nodes[-1]
    assert [n.index for n in h.nodes] == list(range(len(nodes)))
    packet = serialize.loads(serialize.dumps(torch.ops.aten.mm))
    assert packet is torch.ops.aten.mm


def test_graph_out_of_topological_order_is_refused():
    x = Node("x", "input", 0, (), (3,), torch.float32)
    y = Node("y", "call", ew_spec(torch.ops.aten.relu.default, 1), (x,), (3,), torch.float32)
    with pytest.raises(ValueError, match="not in topological order: y uses x"):
        serialize.dumps(Graph([y, x], [x], [y]))
