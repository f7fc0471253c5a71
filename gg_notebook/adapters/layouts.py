"""Parameter layouts that frameworks use, as picklable `gg.Layout` functions.

A `Layout` says how rank r's local tensor derives from the global one with data movement only. The
functions here are small frozen dataclasses (so that layouts read in a capture process travel back
to the parent by value and compare equal across ranks):

* `MeshShards`: a DTensor placement tuple on a device mesh (``Shard(d)`` / ``Replicate()`` per mesh
  dimension, DTensor's chunking: ``torch.chunk`` along ``d``, later chunks empty when uneven), for
  meshes that are not simply "all ranks in order" (sub-meshes, 2-D meshes);
* `StridedBlocks`: the global tensor cut into ``stride * world`` equal blocks along ``dim``, rank r
  holding blocks ``r, world + r, 2 * world + r, ...`` concatenated (megatron-core's
  ``partition_stride``: a GLU ``fc1`` whose rows are ``[gate; up]`` gives each rank ``[gate_r; up_r]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gg_notebook.problem import Layout


@dataclass(frozen=True)
class MeshShards:
    """Rank r's piece of a tensor placed on a device mesh: ``mesh`` is the mesh's rank grid (nested
    tuples), ``placements`` one ``("S", dim)`` / ``("R",)`` per mesh dimension."""

    mesh: tuple
    placements: tuple

    def coordinate(self, rank: int) -> tuple[int, ...] | None:
        def find(grid, prefix):
            if isinstance(grid, int):
                return prefix if grid == rank else None
            for i, sub in enumerate(grid):
                hit = find(sub, prefix + (i,))
                if hit is not None:
                    return hit
            return None

        return find(self.mesh, ())

    def sizes(self) -> tuple[int, ...]:
        out, grid = [], self.mesh
        while not isinstance(grid, int):
            out.append(len(grid))
            grid = grid[0]
        return tuple(out)

    def __call__(self, g: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        coord = self.coordinate(rank)
        if coord is None:
            raise ValueError(f"rank {rank} is not in the device mesh {self.mesh}")
        out = g
        for c, n, p in zip(coord, self.sizes(), self.placements):
            if p[0] == "S":
                d = p[1] % out.dim()
                size = out.shape[d]
                per = -(-size // n)  # torch.chunk's chunk size
                start = min(c * per, size)
                out = out.narrow(d, start, max(0, min(per, size - start)))
        return out


@dataclass(frozen=True)
class StridedBlocks:
    """Cut along ``dim`` into ``stride * world_size`` equal blocks; rank r holds blocks r, W + r, ..."""

    dim: int
    stride: int

    def __call__(self, g: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        blocks = torch.chunk(g, self.stride * world_size, dim=self.dim)
        return torch.cat([blocks[k * world_size + rank] for k in range(self.stride)], dim=self.dim)


def mesh_layout(mesh_ranks, placements) -> Layout:
    """A `Layout` for DTensor-style placements (``Shard``/``Replicate`` objects) on a mesh grid."""
    from torch.distributed.tensor import Replicate, Shard

    encoded = []
    for p in placements:
        if isinstance(p, Shard):
            encoded.append(("S", p.dim))
        elif isinstance(p, Replicate):
            encoded.append(("R",))
        else:
            raise ValueError(f"placement {p!r} is not a Shard or Replicate")
    grid = _nested(mesh_ranks)
    return Layout(MeshShards(grid, tuple(encoded)), name=f"mesh{list(_sizes(grid))}{_show(placements)}")


def strided_layout(dim: int, stride: int) -> Layout:
    return Layout(StridedBlocks(dim, stride), name=f"strided(dim={dim}, stride={stride})")


def _nested(x):
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, int):
        return x
    return tuple(_nested(v) for v in x)


def _sizes(grid) -> tuple[int, ...]:
    out = []
    while not isinstance(grid, int):
        out.append(len(grid))
        grid = grid[0]
    return tuple(out)


def _show(placements) -> str:
    return "(" + ", ".join(type(p).__name__ + (f"({p.dim})" if hasattr(p, "dim") else "()") for p in placements) + ")"
