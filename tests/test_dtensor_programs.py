"""DTensor-native rank functions: the rank builds its DeviceMesh inside the traced function (as real
code does), wraps its local shards with DTensor.from_local, and uses redistribute / full_tensor /
to_local; Partial placements stay partial until redistributed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import gg_notebook as gg


def mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2


def mlp_dtensor(x, w1, w2):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    X = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    W1 = DTensor.from_local(w1, mesh, [Shard(1)], run_check=False)
    W2 = DTensor.from_local(w2, mesh, [Shard(0)], run_check=False)
    y = torch.relu(X @ W1) @ W2  # a Partial DTensor
    return y.redistribute(mesh, [Replicate()]).to_local()


def mlp_dtensor_full(x, w1, w2):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    h = DTensor.from_local(torch.relu(x @ w1), mesh, [Shard(1)], run_check=False)
    W2 = DTensor.from_local(w2, mesh, [Shard(0)], run_check=False)
    return (h @ W2).full_tensor()


def mlp_dtensor_partial_as_local(x, w1, w2):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    h = DTensor.from_local(torch.relu(x @ w1), mesh, [Shard(1)], run_check=False)
    W2 = DTensor.from_local(w2, mesh, [Shard(0)], run_check=False)
    return (h @ W2).to_local()  # BUG: the partial sums are returned as if replicated


def mlp_tp_on_2d_mesh(x, w1, w2):
    """dp x tp mesh of 4 ranks: the tp sub-mesh holds the shards, every dp replica the same batch."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp = mesh["tp"]
    h = DTensor.from_local(torch.relu(x @ w1), tp, [Shard(1)], run_check=False)
    W2 = DTensor.from_local(w2, tp, [Shard(0)], run_check=False)
    return (h @ W2).redistribute(tp, [Replicate()]).to_local()


X, W1, W2 = torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 8)


def problem(fn, placements=(gg.Replicate(), gg.Shard(1), gg.Shard(0)), world_size=2):
    return gg.Problem(mlp, fn, (X, W1, W2), placements, world_size, expect=(gg.Replicate(),))


def test_mesh_built_inside_the_rank_function_is_proved():
    for fn in (mlp_dtensor, mlp_dtensor_full):
        r = gg.verify(problem(fn))
        assert r.proved, (fn.__name__, r)


def test_partial_returned_as_local_is_refuted():
    r = gg.verify(problem(mlp_dtensor_partial_as_local))
    assert r.status is gg.Status.REFUTED, r


def test_tp_sub_mesh_of_a_2d_mesh():
    col = gg.Layout(lambda g, r, w: g.chunk(2, dim=1)[r % 2], name="tp columns")
    row = gg.Layout(lambda g, r, w: g.chunk(2, dim=0)[r % 2], name="tp rows")
    r = gg.verify(problem(mlp_tp_on_2d_mesh, placements=(gg.Replicate(), col, row), world_size=4))
    assert r.proved, r


@pytest.mark.parametrize("batch", [1, 2])
def test_dtensor_sp_mlp_with_one_sequence_is_proved(batch):
    # batch 1: DTensor's Partial -> Shard(1) reduce-scatter (split along the sequence, cat along dim 0,
    # reduce_scatter_tensor) of a [1, S, H] value, whose chunks the store spells as views of row slices
    from gg_notebook.examples import dtensor as D

    assert gg.verify(D.make_sp_mlp(world_size=2, batch=batch, seq=4, hidden=4, ffn=8)).status is gg.Status.PROVED
