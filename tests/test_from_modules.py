"""Models as problems (`gg.Problem.from_modules`): the user gives two builders and a batch; the
parameters, buffers and tensor attributes become inputs, placed as the models' own metadata says
(DTensor placements of `parallelize_module`, 2-D meshes, `param_placements` for hand-sharded code),
forward and gradients are verified, and mismatched models get messages that name the tensor."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.adapters.layouts import MeshShards, StridedBlocks, mesh_layout, strided_layout
from gg_notebook.adapters.modules import ModelError, named_state
from gg_notebook.capture.errors import CaptureError

D, H = 8, 16


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, H, bias=bias)
        self.down = nn.Linear(H, D, bias=bias)

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))


def tp_mlp(tp: int, plan=None, mesh_shape=None, bias: bool = True) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = MLP(bias)
    if tp > 1:
        if mesh_shape is None:
            mesh = init_device_mesh("cpu", (tp,))
        else:
            mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))["tp"]
        parallelize_module(model, mesh, plan or {"up": ColwiseParallel(), "down": RowwiseParallel()})
    return model


def squared_loss(model, x):
    return model(x).pow(2).mean()


X = torch.randn(2, 4, D)


# ------------------------------------------------------------------------- DTensor (parallelize_module)


@pytest.mark.parametrize("grads", [False, True])
def test_parallelize_module_mlp_is_proved(grads):
    problem = gg.Problem.from_modules(
        sequential=lambda: tp_mlp(1), distributed=lambda: tp_mlp(2), inputs=(X,), placements=(gg.Replicate(),),
        world_size=2, forward=squared_loss if grads else None, grads=grads)
    assert problem.input_names == ("norm.weight", "norm.bias", "up.weight", "up.bias", "down.weight", "down.bias",
                                   "x" if grads else "input0")
    assert problem.placements[2:6] == (gg.Shard(0), gg.Shard(0), gg.Shard(1), gg.Replicate())
    r = gg.verify(problem)
    assert r.proved, r
    if grads:  # loss + one gradient per parameter, each expected in its parameter's placement
        assert len(r.relations) == 7
        assert [o.expected for o in r.relations[1:]] == ["Replicate()", "Replicate()", "Shard(0)", "Shard(0)",
                                                         "Shard(1)", "Replicate()"]


def test_sub_mesh_of_a_2d_mesh_is_a_layout_over_the_whole_mesh():
    problem = gg.Problem.from_modules(
        sequential=lambda: tp_mlp(1), distributed=lambda: tp_mlp(4, mesh_shape=(2, 2)), inputs=(X,),
        placements=(gg.Replicate(),), world_size=4, forward=squared_loss, grads=True)
    up = problem.placements[problem.input_names.index("up.weight")]
    assert isinstance(up, gg.Layout) and isinstance(up.fn, MeshShards)
    g = torch.arange(H * D, dtype=torch.float32).view(H, D)
    # ranks 0,1 form the tp group of dp replica 0, ranks 2,3 of replica 1
    assert torch.equal(up.fn(g, 3, 4), g[H // 2:]) and torch.equal(up.fn(g, 2, 4), g[: H // 2])
    r = gg.verify(problem)
    assert r.proved, r


def test_sequence_parallel_plan_without_bias_is_proved():
    """DTensor reduce-scatters along the sequence dim 1 as cat(x.chunk(W, 1), 0) + reduce_scatter."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
            "down": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
    problem = gg.Problem.from_modules(
        sequential=lambda: tp_mlp(1, bias=False), distributed=lambda: tp_mlp(2, plan, bias=False), inputs=(X,),
        placements=(gg.Shard(1),), world_size=2, forward=squared_loss, grads=True)
    r = gg.verify(problem)
    assert r.proved, r


def test_sequence_parallel_plan_with_bias_is_proved():
    # DTensor adds a replicated bias to a partial sum as bias / W on every rank before the
    # reduce-scatter: the scattered pieces are found by the normal form (engine/form_tiling.py)
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
            "down": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
    problem = gg.Problem.from_modules(
        sequential=lambda: tp_mlp(1), distributed=lambda: tp_mlp(2, plan), inputs=(X,),
        placements=(gg.Shard(1),), world_size=2, forward=squared_loss, grads=True)
    assert gg.verify(problem).proved


def test_reduce_scatter_of_chunks_in_the_wrong_order_is_not_proved():
    """cat(x.chunk(W, 1)[::-1], 0) before reduce_scatter_tensor hands rank r the other rank's half."""

    def seq(x, w):
        return x @ w

    def rank(x, w, flip=True):
        part = x @ w  # [B, S, D] partial sums (hidden dim of x and rows of w sharded)
        chunks = list(part.chunk(2, dim=1))
        out = torch.empty(part.shape[0], part.shape[1] // 2, part.shape[2])
        dist.reduce_scatter_tensor(out, torch.cat(chunks[::-1] if flip else chunks, dim=0))
        return out

    x, w = torch.randn(2, 4, 6), torch.randn(6, 3)
    for flip, proved in ((False, True), (True, False)):
        p = gg.Problem(seq, lambda x, w: rank(x, w, flip), (x, w), (gg.Shard(2), gg.Shard(0)), 2, expect=(gg.Shard(1),))
        r = gg.verify(p)
        assert r.proved is proved, r
        if not proved:
            assert r.status is gg.Status.REFUTED


def test_local_loss_of_a_sequence_sharded_output_is_refuted():
    """With use_local_output=True (the default) forward's mean is taken over the rank's local
    sequence shard only: a wrong loss, whatever the rest."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
            "down": RowwiseParallel(output_layouts=Shard(1))}
    problem = gg.Problem.from_modules(
        sequential=lambda: tp_mlp(1, bias=False), distributed=lambda: tp_mlp(2, plan, bias=False), inputs=(X,),
        placements=(gg.Shard(1),), world_size=2, forward=squared_loss, grads=True)
    r = gg.verify(problem)
    assert r.status is gg.Status.REFUTED, r
    assert "squared_loss" in (r.culprit.code or "") or "mean" in r.culprit.op


# ------------------------------------------------------------------- hand-sharded modules


class ColumnLinear(nn.Module):
    def __init__(self, i, o, world):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o // world, i))

    def forward(self, x):
        return x @ self.weight.t()


class RowLinear(nn.Module):
    def __init__(self, i, o, world, reduce=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i // world))
        self.reduce = reduce

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.reduce and world_size() > 1:
            dist.all_reduce(y)
        return y


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


class HandMLP(nn.Module):
    def __init__(self, reduce=True):
        super().__init__()
        w = world_size()
        self.up = ColumnLinear(D, H, w)
        self.down = RowLinear(H, D, w, reduce)
        # a rotary-style table held as a plain tensor attribute (not a parameter or a buffer)
        self.scale = 1.0 / (10.0 ** (torch.arange(D, dtype=torch.float32) / D))

    def forward(self, x):
        return self.down(torch.relu(self.up(x * self.scale)))


HAND = {"up.weight": gg.Shard(0), "down.weight": gg.Shard(1)}


def test_hand_sharded_model_with_param_placements_is_proved_and_attributes_are_inputs():
    problem = gg.Problem.from_modules(
        sequential=HandMLP, distributed=HandMLP, inputs=(X,), placements=(gg.Replicate(),), world_size=2,
        forward=squared_loss, grads=True, param_placements=HAND)
    assert "scale" in problem.input_names
    r = gg.verify(problem)
    assert r.proved, r


def test_hand_sharded_model_missing_its_all_reduce_is_refuted_at_the_module_line():
    problem = gg.Problem.from_modules(
        sequential=HandMLP, distributed=lambda: HandMLP(reduce=False), inputs=(X,), placements=(gg.Replicate(),),
        world_size=2, forward=squared_loss, grads=True, param_placements=HAND)
    r = gg.verify(problem)
    assert r.status is gg.Status.REFUTED, r
    assert not r.proved


def test_a_buffer_the_rank_computes_differently_is_refused():
    """The ranks' rotary-style table is computed by their own code: replacing it with the sequential
    model's values would verify a program the ranks do not run."""

    class Skewed(HandMLP):
        def __init__(self):
            super().__init__()
            if world_size() > 1:
                self.scale = self.scale * 1.001

    problem = gg.Problem.from_modules(
        sequential=HandMLP, distributed=Skewed, inputs=(X,), placements=(gg.Replicate(),), world_size=2,
        param_placements=HAND)
    with pytest.raises(ModelError, match=r"rank 0: attribute scale holds values .* differ from the sequential"):
        gg.verify(problem)


class AlwaysReduces(HandMLP):
    """Reduces whatever the world size, as code written for a cluster does: in the single-device model
    (a process group of one rank) the all-reduce is the identity."""

    def forward(self, x):
        y = torch.relu(self.up(x * self.scale)) @ self.down.weight.t()
        dist.all_reduce(y)
        return y


def test_collectives_of_the_single_device_model_are_the_identity():
    problem = gg.Problem.from_modules(
        sequential=AlwaysReduces, distributed=AlwaysReduces, inputs=(X,), placements=(gg.Replicate(),), world_size=2,
        param_placements=HAND, expect=(gg.Replicate(),))
    r = gg.verify(problem)
    assert r.proved, r


def test_unplaced_sharded_parameter_names_the_parameter_and_the_fix():
    with pytest.raises(ModelError, match=r"up\.weight has local shape \(8, 8\).*\(16, 8\).*param_placements"):
        gg.Problem.from_modules(sequential=HandMLP, distributed=HandMLP, inputs=(X,), placements=(gg.Replicate(),),
                                world_size=2)


def test_placement_contradicting_the_local_shape_is_refused_at_capture():
    problem = gg.Problem.from_modules(
        sequential=HandMLP, distributed=HandMLP, inputs=(X,), placements=(gg.Replicate(),), world_size=2,
        param_placements={"up.weight": gg.Shard(1), "down.weight": gg.Shard(1)})
    with pytest.raises(Exception, match=r"up\.weight"):
        gg.verify(problem)


def test_models_with_different_tensors_are_refused_with_their_names():
    class Other(HandMLP):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ModelError, match=r"extra\.weight"):
        gg.Problem.from_modules(sequential=HandMLP, distributed=Other, inputs=(X,), placements=(gg.Replicate(),),
                                world_size=2, param_placements=HAND)


def test_grads_need_a_scalar_loss():
    problem = gg.Problem.from_modules(
        sequential=HandMLP, distributed=HandMLP, inputs=(X,), placements=(gg.Replicate(),), world_size=2,
        grads=True, param_placements=HAND)
    with pytest.raises(Exception, match="scalar loss"):
        gg.verify(problem)


def test_a_builder_that_fails_names_its_line():
    def broken():
        raise RuntimeError("no GPU here")

    with pytest.raises(CaptureError, match=r"building the model \(sequential\(\)\) raised RuntimeError.*no GPU here"):
        gg.Problem.from_modules(sequential=broken, distributed=HandMLP, inputs=(X,), placements=(gg.Replicate(),),
                                world_size=2)


def test_expect_for_forward_outputs_is_checked():
    problem = gg.Problem.from_modules(
        sequential=HandMLP, distributed=HandMLP, inputs=(X,), placements=(gg.Replicate(),), world_size=2,
        param_placements=HAND, expect=(gg.Shard(0),))
    r = gg.verify(problem)  # the output is replicated, not sharded along the batch
    assert not r.proved
    problem = gg.Problem.from_modules(
        sequential=HandMLP, distributed=HandMLP, inputs=(X,), placements=(gg.Replicate(),), world_size=2,
        param_placements=HAND, expect=(gg.Replicate(),))
    assert gg.verify(problem).proved


# ---------------------------------------------------------------------------------- layouts


def test_strided_blocks_give_each_rank_its_gate_and_up_rows():
    g = torch.arange(8 * 3).view(8, 3)
    lay = strided_layout(0, 2)
    gate, up = g[:4], g[4:]
    for r in range(2):
        assert torch.equal(lay.fn(g, r, 2), torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]))
    assert lay == strided_layout(0, 2) and lay != strided_layout(0, 1)


@pytest.mark.parametrize("shape,placements", [((5, 3), ("S0",)), ((4, 6), ("S1", "S0")), ((7,), ("R", "S0"))])
def test_mesh_shards_agree_with_dtensor_local_shapes_and_offsets(shape, placements):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from gg_notebook.capture.tracing import fake_process_group

    mesh_shape = (2,) if len(placements) == 1 else (2, 2)
    W = 2 if len(placements) == 1 else 4
    pls = tuple(Replicate() if p == "R" else Shard(int(p[1])) for p in placements)
    g = torch.arange(int(torch.tensor(shape).prod())).view(shape)
    for rank in range(W):
        with fake_process_group(rank, W):
            mesh = init_device_mesh("cpu", mesh_shape)
            lshape, offset = compute_local_shape_and_global_offset(shape, mesh, pls)
            grid = mesh.mesh.tolist()
        piece = mesh_layout(grid, pls).fn(g, rank, W)
        want = g
        for d, (o, n) in enumerate(zip(offset, lshape)):
            want = want.narrow(d, o, n)
        assert torch.equal(piece, want), (rank, piece, want)


def test_named_state_lists_parameters_buffers_and_tensor_attributes_once():
    m = HandMLP()
    m.register_buffer("pos", torch.arange(4))
    m.alias = m.up.weight  # a tied reference is not a second tensor
    state = named_state(m)
    assert state["down.weight"][0] == "parameter" and state["pos"][0] == "buffer" and state["scale"][0] == "attribute"
    assert ("alias" in state) != ("up.weight" in state)  # the tied parameter once, under its first name
