"""Collectives are matched per communicator (process group), not per set of ranks.

Two process groups over the same ranks (the default group and ``dist.new_group([0, 1])``) are two
communicators: independent queues whose collectives never match each other, and each collective
blocks until every member of its group has issued it. A program whose ranks issue collectives on
them in different orders hangs (or mixes up data) in a real job; it must never be proved.
"""

import inspect

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

import gg_notebook as gg
from gg_notebook.capture import CaptureError, CollectiveInfo, capture_problem
from gg_notebook.concrete.simulate import SimulationError, run_ranks
from gg_notebook.engine.index import DIndex
from gg_notebook.ir.graph import Graph, Node
from gg_notebook.problem import Partial, Problem
from gg_notebook.relations.expr import ExprStore

HERE = "test_communicators.py"


def line_of(fn, text):
    lines, start = inspect.getsourcelines(fn)
    for i, l in enumerate(lines):
        if text in l:
            return f"{HERE}:{start + i}"
    raise AssertionError(text)


def totals(x, y):
    return x, y  # each rank holds a partial sum of x and of y: an all-reduce (sum) rebuilds them


def problem(fn):
    return Problem(sequential=totals, distributed=fn, inputs=(torch.randn(4), torch.randn(4)),
                   placements=(Partial(), Partial()), world_size=2, input_names=("x", "y"))


# ------------------------------------------------------------------------- the in-place API


def each_group_used_consistently(x, y):
    helper = dist.new_group([0, 1])
    dist.all_reduce(x)  # the default group
    dist.all_reduce(y, group=helper)
    return x, y


def groups_issued_in_opposite_orders(x, y):
    helper = dist.new_group([0, 1])
    if dist.get_rank() == 0:
        dist.all_reduce(x)
        dist.all_reduce(y, group=helper)
    else:
        dist.all_reduce(y, group=helper)
        dist.all_reduce(x)
    return x, y


def groups_swapped_on_one_rank(x, y):
    # same call order on every rank, but rank 1 sends x through the helper group and y through the
    # default group: matched by ranks + order this looked right; per communicator it pairs rank 0's
    # x with rank 1's y (and deadlocks)
    helper = dist.new_group([0, 1])
    first, second = (None, helper) if dist.get_rank() == 0 else (helper, None)
    dist.all_reduce(x, group=first)
    dist.all_reduce(y, group=second)
    return x, y


def test_each_group_used_consistently_is_proved():
    result = gg.verify(problem(each_group_used_consistently))
    assert result.status is gg.Status.PROVED, str(result)


@pytest.mark.parametrize("fn", [groups_issued_in_opposite_orders, groups_swapped_on_one_rank])
def test_groups_over_the_same_ranks_are_different_communicators(fn):
    with pytest.raises(CaptureError) as ei:
        gg.verify(problem(fn))
    msg = str(ei.value)
    assert msg.startswith("the ranks' collectives deadlock: rank 0 waits in all_reduce(sum)"), msg
    assert "the default group (ranks 0, 1)" in msg
    created = line_of(fn, "helper = dist.new_group([0, 1])")
    assert "the group created by `helper = dist.new_group([0, 1])` at " in msg and created in msg
    assert "never match each other" in msg and "hangs" in msg
    assert ei.value.rank == 0


def test_communicator_identity_in_collective_info():
    cap = capture_problem(problem(each_group_used_consistently))
    by_comm = {m.comm: m for m in cap.collectives}
    assert sorted(by_comm) == ["0", "1"]  # the default group, then the first new_group
    assert by_comm["0"].index == by_comm["1"].index == 0  # program order is per communicator
    assert by_comm["0"].group == by_comm["1"].group == (0, 1)
    assert by_comm["0"].comm_label == "the default group (ranks 0, 1)"


def barrier_on_one_rank_first(x, y):
    helper = dist.new_group([0, 1])
    if dist.get_rank() == 0:
        dist.barrier()
        dist.all_reduce(y, group=helper)
    else:
        dist.all_reduce(y, group=helper)
        dist.barrier()
    dist.all_reduce(x)
    return x, y


def test_barriers_count_in_the_issue_order():
    with pytest.raises(CaptureError, match=r"rank 0 waits in barrier at .*collective #0 on the default group"):
        gg.verify(problem(barrier_on_one_rank_first))


# ------------------------------------------------------------------------- functional collectives


def functional_consistent(x, y):
    helper = dist.new_group([0, 1])
    x = fc.all_reduce(x, "sum", dist.group.WORLD)
    y = fc.all_reduce(y, "sum", helper)
    return x, y


def functional_opposite_orders(x, y):
    helper = dist.new_group([0, 1])
    if dist.get_rank() == 0:
        x = fc.all_reduce(x, "sum", dist.group.WORLD)
        y = fc.all_reduce(y, "sum", helper)
    else:
        y = fc.all_reduce(y, "sum", helper)
        x = fc.all_reduce(x, "sum", dist.group.WORLD)
    return x, y


def functional_by_group_name(x, y):
    # the group name string (what DTensor passes) identifies the communicator too
    helper = dist.new_group([0, 1])
    names = [dist.group.WORLD.group_name, helper.group_name]
    if dist.get_rank() == 1:
        names.reverse()
    return fc.all_reduce(x, "sum", names[0]), fc.all_reduce(y, "sum", names[1])


def test_functional_collectives_consistent_is_proved():
    result = gg.verify(problem(functional_consistent))
    assert result.status is gg.Status.PROVED, str(result)


@pytest.mark.parametrize("fn", [functional_opposite_orders, functional_by_group_name])
def test_functional_collectives_on_two_groups_in_different_orders(fn):
    with pytest.raises(CaptureError, match="the ranks' collectives deadlock") as ei:
        gg.verify(problem(fn))
    assert "the default group (ranks 0, 1)" in str(ei.value)


# ------------------------------------------------------------------------- engine and simulator agree


def _graph(rank, collectives):
    """x, y inputs; then all_reduce(sum) of the named input on each communicator, in order."""
    x = Node("x", "input", 0, (), (4,), torch.float64, rank=rank)
    y = Node("y", "input", 1, (), (4,), torch.float64, rank=rank)
    nodes = [x, y]
    idx: dict[str, int] = {}
    for comm, src in collectives:
        info = CollectiveInfo("all_reduce", "sum", (0, 1), idx.setdefault(comm, 0), comm=comm,
                              comm_label=f"group {comm}")
        idx[comm] += 1
        nodes.append(Node(f"ar_{comm}", "collective", info, ({"x": x, "y": y}[src],), (4,), torch.float64,
                          target="all_reduce(sum)", rank=rank))
    return Graph(nodes, [x, y], nodes[2:], rank=rank)


def _index(graphs):
    store = ExprStore()
    terms = [[store.atom(f"{n}{r}", (4,), torch.float64) for n in "xy"] for r in range(2)]  # x0, y0 / x1, y1
    return DIndex(store, graphs, terms)


def test_engine_and_simulator_key_collectives_by_communicator():
    # same order on both ranks, but rank 1 all-reduces y on communicator "0": the engine's terms and
    # the simulator's values both pair rank 0's x with rank 1's y
    graphs = [_graph(0, [("0", "x"), ("1", "y")]), _graph(1, [("0", "y"), ("1", "x")])]
    index = _index(graphs)
    n = {(r, node.name): node for r, gr in enumerate(graphs) for node in gr.nodes}
    assert index.dval_of(0, n[(0, "ar_0")]) is index.dval_of(1, n[(1, "ar_0")])
    assert index.dval_of(0, n[(0, "ar_0")]) is not index.dval_of(1, n[(1, "ar_1")])
    t = index.dval_of(0, n[(0, "ar_0")]).term
    assert sorted(a.attrs[0] for a in t.args) == ["x0", "y1"]
    locals_ = [[torch.randn(4, dtype=torch.float64) for _ in range(2)] for _ in range(2)]
    envs = run_ranks(graphs, locals_)
    torch.testing.assert_close(envs[0]["ar_0"], locals_[0][0] + locals_[1][1])
    torch.testing.assert_close(envs[1]["ar_0"], envs[0]["ar_0"])
    torch.testing.assert_close(envs[1]["ar_1"], locals_[1][0] + locals_[0][1])


def test_engine_and_simulator_agree_on_a_deadlock():
    graphs = [_graph(0, [("0", "x"), ("1", "y")]), _graph(1, [("1", "y"), ("0", "x")])]
    with pytest.raises(CaptureError, match="rank 0 waits in all_reduce.*on group 0.*rank 1 waits in all_reduce.*on group 1"):
        _index(graphs)
    locals_ = [[torch.randn(4, dtype=torch.float64) for _ in range(2)] for _ in range(2)]
    with pytest.raises(SimulationError, match="deadlock in simulation: rank 0 waits in all_reduce.*on group 0"):
        run_ranks(graphs, locals_)
