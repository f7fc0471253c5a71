"""DTensor's ``_StridedShard(d, split_factor=k)`` (transformers' packed_colwise / packed_rowwise: a
fused [gate; up] weight, each block split over the ranks) is read by `from_modules` as the layout
rank r's local tensor really has: checked against `distribute_tensor` on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gg_notebook.adapters.modules import ModelError, dtensor_placement
from gg_notebook.problem import Layout, local_input

_StridedShard = pytest.importorskip("torch.distributed.tensor.placement_types")._StridedShard


@pytest.mark.parametrize("W", [2, 4])
def test_strided_shard_layout_is_what_distribute_tensor_gives_each_rank(W):
    from torch.distributed.tensor import distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    for r in range(W):
        dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=W)
        try:
            torch._C._clear_DTensor_sharding_propagator_cache()
            mesh = torch.distributed.init_device_mesh("cpu", (W,))
            for dim, k, shape in ((0, 2, (16, 3)), (1, 2, (3, 16)), (0, 3, (24, 2)), (-1, 2, (2, 3, 8))):
                t = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
                d = distribute_tensor(t, mesh, [_StridedShard(dim, split_factor=k)], src_data_rank=None)
                layout = dtensor_placement(d, W)
                assert isinstance(layout, Layout)
                assert torch.equal(local_input(t, layout, r, W), d.to_local()), (W, r, dim, k)
            d = distribute_tensor(torch.zeros(10, 2), mesh, [_StridedShard(0, split_factor=2)], src_data_rank=None)
            with pytest.raises(ModelError, match="not divisible"):
                dtensor_placement(d, W)
        finally:
            dist.destroy_process_group()
