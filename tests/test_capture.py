"""Tests for gg_notebook.capture: graphs, collectives, sources, matching and errors."""

import inspect

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from gg_notebook.capture import (
    CaptureError,
    CollectiveInfo,
    capture_layout,
    capture_problem,
    collective_result,
)
from gg_notebook.problem import Layout, Partial, Problem, Replicate, Shard

HERE = "test_capture.py"


def line_of(fn, text):
    """'test_capture.py:N' of the first line of fn containing text."""
    lines, start = inspect.getsourcelines(fn)
    for i, l in enumerate(lines):
        if text in l:
            return f"{HERE}:{start + i}"
    raise AssertionError(text)


def results(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is collective_result]


def check_value_semantics(gm):
    for n in gm.graph.nodes:
        if n.op == "call_function" and hasattr(n.target, "_schema"):
            assert not n.target._schema.is_mutable, n.format_node()
            assert n.target.namespace not in ("c10d", "_c10d_functional"), n.format_node()
        assert n.op != "get_attr" or not isinstance(getattr(gm, n.target), torch.ScriptObject)


# ---------------------------------------------------------------------------------------- MLP


def seq_mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2


def dist_mlp(x, w1, w2):
    y = torch.relu(x @ w1) @ w2
    torch.distributed.all_reduce(y)
    return y


def mlp_problem(W, meta=False):
    dev = "meta" if meta else "cpu"
    return Problem(
        sequential=seq_mlp, distributed=dist_mlp,
        inputs=(torch.randn(4, 8, device=dev), torch.randn(8, 16, device=dev), torch.randn(16, 8, device=dev)),
        placements=(Replicate(), Shard(1), Shard(0)), world_size=W,
    )


@pytest.mark.parametrize("W", [2, 4])
def test_mlp(W):
    cap = capture_problem(mlp_problem(W))
    assert cap.world_size == W and len(cap.ranks) == W
    assert set(cap.timings) >= {"sequential", "ranks"}
    for r, gm in enumerate(cap.ranks):
        check_value_semantics(gm)
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        assert [p.meta["gg_input_index"] for p in ph] == [0, 1, 2]
        assert [p.meta["gg_input_name"] for p in ph] == ["x", "w1", "w2"]
        assert tuple(ph[1].meta["val"].shape) == (8, 16 // W)
        (res,) = results(gm)
        info = res.meta["gg_collective"]
        assert info == CollectiveInfo("all_reduce", "sum", tuple(range(W)), 0, comm="0")
        assert res.args[0].target is torch.ops.aten.mm.default
        assert tuple(res.meta["val"].shape) == (4, 8)
        assert res.meta["gg_source"].endswith(line_of(dist_mlp, "all_reduce"))
        mm = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default]
        assert all(n.meta["gg_source"].endswith(line_of(dist_mlp, "relu")) for n in mm)
        assert mm[0].meta["gg_frames"][-1][2] == "dist_mlp"
        out = next(n for n in gm.graph.nodes if n.op == "output")
        assert out.args[0] == (res,)
    (m,) = cap.collectives
    assert (m.group, m.index, m.kind, m.reduce_op) == (tuple(range(W)), 0, "all_reduce", "sum")
    assert m.nodes == {r: "collective_result" for r in range(W)}
    seq_out = next(n for n in cap.sequential.graph.nodes if n.op == "output")
    assert len(seq_out.args[0]) == 1 and not results(cap.sequential)


def test_meta_inputs():
    cap = capture_problem(mlp_problem(2, meta=True))
    ph = [n for n in cap.ranks[0].graph.nodes if n.op == "placeholder"]
    assert ph[2].meta["val"].shape == (8, 8)


# ---------------------------------------------------------------------------------------- all collective kinds


def seq_id(x):
    return x


def all_kinds(x):
    a = x.clone()
    dist.all_reduce(a)
    b = x.clone()
    dist.all_reduce(b, op=dist.ReduceOp.MAX)
    c = x.clone()
    dist.all_reduce(c, op=dist.ReduceOp.MIN)
    d = x.clone()
    dist.all_reduce(d, op=dist.ReduceOp.AVG)
    lst = [torch.empty_like(x) for _ in range(2)]
    dist.all_gather(lst, x)
    g = torch.empty(8, 4)
    dist.all_gather_into_tensor(g, x)
    rs = torch.empty(2, 4)
    dist.reduce_scatter_tensor(rs, x)
    a2a = torch.empty_like(x)
    dist.all_to_all_single(a2a, x)
    a2a_split = torch.empty(4, 4)
    dist.all_to_all_single(a2a_split, x, output_split_sizes=[1, 3] if dist.get_rank() == 0 else [3, 1],
                           input_split_sizes=[1, 3] if dist.get_rank() == 0 else [3, 1])
    bc = x.clone()
    dist.broadcast(bc, src=1)
    f = fc.all_reduce(x, "sum", dist.group.WORLD)
    fg = fc.all_gather_single(x, 0, dist.group.WORLD)
    return a + b + c + d + lst[0] + lst[1] + a2a + a2a_split + bc + f, g + fg, rs


def test_all_collective_kinds():
    p = Problem(sequential=lambda x: (x, x, x), distributed=all_kinds, inputs=(torch.randn(4, 4),),
                placements=(Replicate(),), world_size=2)
    cap = capture_problem(p)
    kinds = [(m.kind, m.reduce_op) for m in cap.collectives]
    assert kinds == [
        ("all_reduce", "sum"), ("all_reduce", "max"), ("all_reduce", "min"), ("all_reduce", "avg"),
        ("all_gather", None), ("all_gather_into_tensor", None), ("reduce_scatter_tensor", "sum"),
        ("all_to_all_single", None), ("all_to_all_single", None), ("broadcast", None),
        ("all_reduce", "sum"), ("all_gather_into_tensor", None),
    ]
    assert [m.index for m in cap.collectives] == list(range(12))
    for r, gm in enumerate(cap.ranks):
        check_value_semantics(gm)
        assert not [n for n in gm.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)]
        res = results(gm)
        infos = [n.meta["gg_collective"] for n in res]
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        gathered = [n for n in res if n.meta["gg_collective"].kind == "all_gather"]
        assert [n.meta["gg_collective"].out_index for n in gathered] == [0, 1]
        assert all(n.args == (x,) for n in gathered)
        split = [i for i in infos if i.input_split_sizes]
        assert split[0].input_split_sizes == ((1, 3) if r == 0 else (3, 1))
        bc = next(i for i in infos if i.kind == "broadcast")
        assert bc.src == 1
        shapes = {i.kind: tuple(n.meta["val"].shape) for n, i in zip(res, infos)}
        assert shapes["all_gather_into_tensor"] == (8, 4) and shapes["reduce_scatter_tensor"] == (2, 4)
        for n in res:
            assert n.meta["gg_source"] and HERE in n.meta["gg_source"]
            assert len(n.args) == 1


def into_views(x):
    buf = x * 2
    dist.all_reduce(buf[0:2])
    out = torch.zeros(4, 4)
    dist.all_gather(list(out.chunk(2)), x[0:2])
    return buf, out


def test_collectives_into_views():
    p = Problem(sequential=lambda x: (x, x), distributed=into_views, inputs=(torch.randn(4, 4),),
                placements=(Replicate(),), world_size=2)
    gm = capture_problem(p).ranks[0]
    check_value_semantics(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    # the write into the view reaches the returned base tensors
    assert out[0].target is torch.ops.aten.slice_scatter.default
    assert out[0].args[1].target is collective_result
    assert out[1].target is torch.ops.aten.slice_scatter.default


def sub_groups(x):
    g01 = dist.new_group([0, 1])
    g23 = dist.new_group([2, 3])
    dist.all_reduce(x, group=g01 if dist.get_rank() < 2 else g23)
    return x


def test_sub_groups():
    p = Problem(sequential=seq_id, distributed=sub_groups, inputs=(torch.randn(4),),
                placements=(Replicate(),), world_size=4)
    cap = capture_problem(p)
    assert sorted(m.group for m in cap.collectives) == [(0, 1), (2, 3)]
    assert results(cap.ranks[3])[0].meta["gg_collective"].group == (2, 3)


# ---------------------------------------------------------------------------------------- autograd


class CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


def seq_grad(x, w):
    y = torch.tanh(x @ w)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    return y, gx


def dist_grad(x, w):
    xx = CopyToTP.apply(x)
    y = torch.tanh(xx @ w)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    return y, gx


def test_autograd_function_backward_collective():
    p = Problem(sequential=seq_grad, distributed=dist_grad,
                inputs=(torch.randn(4, 8, requires_grad=True), torch.randn(8, 6)),
                placements=(Replicate(), Shard(1)), world_size=2)
    cap = capture_problem(p)
    for gm in [cap.sequential] + cap.ranks:
        check_value_semantics(gm)
        assert next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].requires_grad
        bwd = [n for n in gm.graph.nodes if n.meta.get("gg_backward")]
        assert bwd, "backward nodes are recorded"
        for n in bwd:
            assert HERE in n.meta["gg_source"], n.format_node()
        # the tanh backward points at the forward line that computed tanh
        tanh_bwd = [n for n in bwd if n.target is torch.ops.aten.tanh_backward.default]
        assert tanh_bwd and tanh_bwd[0].meta["gg_source_kind"] == "forward"
        fn = seq_grad if gm is cap.sequential else dist_grad
        assert tanh_bwd[0].meta["gg_source"].endswith(line_of(fn, "tanh"))
    for gm in cap.ranks:
        (res,) = results(gm)
        assert res.meta["gg_backward"] and res.meta["gg_source_kind"] == "backward_code"
        assert res.meta["gg_source"].endswith(line_of(CopyToTP.backward, "all_reduce"))
        assert res.meta["gg_collective"].kind == "all_reduce"
    assert len(cap.collectives) == 1


# ---------------------------------------------------------------------------------------- value semantics


def seq_inplace(x):
    y = x * 1
    y[y < 0] = 0
    y.add_(1)
    y.mul_(2)
    return y


def test_value_semantics():
    p = Problem(sequential=seq_inplace, distributed=seq_inplace, inputs=(torch.randn(4, 4),),
                placements=(Shard(0),), world_size=2)
    cap = capture_problem(p)
    gm = cap.sequential
    check_value_semantics(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.index_put.default in targets
    assert torch.ops.aten.add.Tensor in targets
    add = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    assert add.meta["gg_source"].endswith(line_of(seq_inplace, "add_"))


# ---------------------------------------------------------------------------------------- mismatches


def mismatched_kind(x):
    if dist.get_rank() == 0:
        dist.all_reduce(x)
    else:
        x = fc.all_gather_single(x, 0, dist.group.WORLD)[:4]
    return x


def test_mismatched_collective_kind():
    p = Problem(sequential=seq_id, distributed=mismatched_kind, inputs=(torch.randn(4),),
                placements=(Replicate(),), world_size=2)
    with pytest.raises(CaptureError) as ei:
        capture_problem(p)
    msg = str(ei.value)
    assert "rank 1 calls all_gather_into_tensor at" in msg and "rank 0 calls all_reduce(sum)" in msg
    assert line_of(mismatched_kind, "all_reduce(x)") in msg and line_of(mismatched_kind, "all_gather") in msg
    assert "collective #0 on the default group (ranks 0, 1)" in msg
    assert ei.value.rank == 1


def missing_collective(x):
    if dist.get_rank() != 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def test_missing_collective():
    p = Problem(sequential=seq_id, distributed=missing_collective, inputs=(torch.randn(4),),
                placements=(Replicate(),), world_size=3)
    with pytest.raises(CaptureError) as ei:
        capture_problem(p)
    msg = str(ei.value)
    assert "rank 0 calls all_reduce(max)" in msg and "rank 1 issues only 0" in msg
    assert line_of(missing_collective, "all_reduce") in msg


def mismatched_shape(x):
    dist.all_reduce(x[: 2 + dist.get_rank()])
    return x


def test_mismatched_shapes():
    p = Problem(sequential=seq_id, distributed=mismatched_shape, inputs=(torch.randn(4),),
                placements=(Replicate(),), world_size=2)
    with pytest.raises(CaptureError, match=r"rank 1 calls all_reduce\(sum\).*input shapes \(\(3,\)"):
        capture_problem(p)


# ---------------------------------------------------------------------------------------- errors


def raises_on_rank1(x, w):
    if dist.get_rank() == 1:
        w = w.t()
    return x @ w


def seq_mm(x, w):
    return x @ w


def test_rank_raises():
    p = Problem(sequential=seq_mm, distributed=raises_on_rank1, inputs=(torch.randn(3, 4), torch.randn(4, 6)),
                placements=(Replicate(), Replicate()), world_size=2)
    with pytest.raises(CaptureError) as ei:
        capture_problem(p)
    e = ei.value
    assert e.rank == 1 and e.source.endswith(line_of(raises_on_rank1, "return x @ w"))
    assert str(e).startswith("rank 1 raised RuntimeError at") and line_of(raises_on_rank1, "return x @ w") in str(e)
    assert not dist.is_initialized()


def data_dependent(x):
    if x.sum() > 0:
        return x
    return -x


def test_data_dependent_control_flow():
    p = Problem(sequential=seq_id, distributed=data_dependent, inputs=(torch.randn(4),),
                placements=(Replicate(),), world_size=2)
    with pytest.raises(CaptureError) as ei:
        capture_problem(p)
    msg = str(ei.value)
    assert "rank 0: control flow that depends on tensor values cannot be traced" in msg
    assert line_of(data_dependent, "if x.sum()") in msg and "torch.where" in msg
    assert not dist.is_initialized()
    # the kernel keeps working after the error
    capture_problem(mlp_problem(2))


def seq_bad(x):
    return x @ x[:2]


def test_sequential_raises():
    p = Problem(sequential=seq_bad, distributed=seq_id, inputs=(torch.randn(3, 4),),
                placements=(Replicate(),), world_size=2)
    with pytest.raises(CaptureError) as ei:
        capture_problem(p)
    assert ei.value.rank is None
    assert str(ei.value).startswith("the sequential program raised RuntimeError at")
    assert line_of(seq_bad, "return x @ x") in str(ei.value)


def returns_int(x):
    return x, 3


def test_non_tensor_output():
    p = Problem(sequential=lambda x: (x, x), distributed=returns_int, inputs=(torch.randn(4),),
                placements=(Replicate(),), world_size=2)
    with pytest.raises(CaptureError, match="rank 0 returns a int as output 1"):
        capture_problem(p)


def output_count_by_rank(x):
    return (x,) if dist.get_rank() == 0 else (x, x)


def test_output_counts():
    p = Problem(sequential=lambda x: x, distributed=output_count_by_rank, inputs=(torch.randn(4),),
                placements=(Replicate(),), world_size=2)
    with pytest.raises(CaptureError, match="rank 1 returns 2 outputs but rank 0 returns 1"):
        capture_problem(p)
    p = Problem(sequential=lambda x: (x, x), distributed=seq_id, inputs=(torch.randn(4),),
                placements=(Replicate(),), world_size=2)
    with pytest.raises(CaptureError, match="ranks return 1 outputs but the sequential program returns 2"):
        capture_problem(p)


# ---------------------------------------------------------------------------------------- layouts


def interleave(g, rank, W):
    return g.view(-1, W, g.shape[-1])[:, rank]


def bad_layout(g, rank, W):
    return g.view(7, -1)


def test_capture_layout():
    gm = capture_layout(Layout(interleave), torch.randn(8, 3), 1, 2)
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(ph) == 1
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out[0].meta["val"].shape) == (4, 3)
    with pytest.raises(CaptureError, match="layout bad_layout.*raised RuntimeError") as ei:
        capture_layout(Layout(bad_layout), torch.randn(8, 3), 0, 2)
    assert line_of(bad_layout, "view(7") in str(ei.value)


# ---------------------------------------------------------------------------------------- autograd semantics


def seq_wgrad(x, w):
    y = x @ w
    (g,) = torch.autograd.grad(y.sum(), [w])
    return y, g


def inplace_fwd_allreduce(x, w):
    dist.barrier()
    y = x @ w
    dist.all_reduce(y)
    (g,) = torch.autograd.grad(y.sum(), [w])
    return y, g


def functional_fwd_allreduce(x, w):
    y = fc.all_reduce(x @ w, "sum", dist.group.WORLD)
    (g,) = torch.autograd.grad(y.sum(), [w])
    return y, g


def test_autograd_semantics_of_forward_collectives():
    def cap(fn):
        return capture_problem(Problem(
            sequential=seq_wgrad, distributed=fn, inputs=(torch.randn(4, 8), torch.randn(8, 6, requires_grad=True)),
            placements=(Shard(1), Shard(0)), world_size=2))
    # eager semantics: the in-place all_reduce is an identity in backward (one collective); barrier dropped
    assert [m.kind for m in cap(inplace_fwd_allreduce).collectives] == ["all_reduce"]
    # the functional all_reduce is differentiable: its backward all-reduces again
    c = cap(functional_fwd_allreduce)
    assert [m.kind for m in c.collectives] == ["all_reduce", "all_reduce"]
    assert results(c.ranks[0])[1].meta.get("gg_backward")
