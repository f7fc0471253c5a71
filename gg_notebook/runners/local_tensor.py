"""Run a Problem's distributed program on all ranks in this process with ``LocalTensorMode``.

The ``world_size`` ranks are simulated with ``torch.distributed._local_tensor.LocalTensorMode`` on a
``"fake"`` process group: every tensor holds one value per rank and c10d collectives are computed
across them. ``dist.get_rank()`` is patched, for the duration of the run, to return the per-rank
symbolic int LocalTensorMode uses for device meshes, so rank arithmetic (vocabulary offsets, ...) is
evaluated per rank.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist

from gg_notebook.problem import Problem
from gg_notebook.runners.inputs import local_inputs
from gg_notebook.runners.outputs import flat_outputs


@contextlib.contextmanager
def _fake_process_group(world_size: int):
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _patched_get_rank():
    from torch.distributed._local_tensor import LocalIntNode, enabled_local_tensor_mode

    original = dist.get_rank

    def get_rank(group=None):
        lm = enabled_local_tensor_mode()
        if lm is None:
            return original(group)
        return torch.SymInt(LocalIntNode({r: r for r in lm.ranks}))

    dist.get_rank = get_rank
    try:
        yield
    finally:
        dist.get_rank = original


def run_local_tensor(problem: Problem) -> list[list[torch.Tensor]]:
    """Per-rank outputs (``outs[rank][k]``) via LocalTensorMode."""
    from torch.distributed._local_tensor import LocalTensor, LocalTensorMode

    W = problem.world_size
    per_rank = [local_inputs(problem, r) for r in range(W)]
    with _fake_process_group(W), _patched_get_rank(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with LocalTensorMode(W):
            args = []
            for i in range(len(problem.inputs)):
                locs = {r: per_rank[r][i].detach() for r in range(W)}
                lt = LocalTensor(locs)
                if problem.inputs[i].requires_grad:
                    lt.requires_grad_()
                args.append(lt)
            out = problem.distributed(*args)
        leaves = flat_outputs(out)
        result = [[] for _ in range(W)]
        for leaf in leaves:
            for r in range(W):
                if isinstance(leaf, LocalTensor):
                    result[r].append(leaf._local_tensors[r].detach())
                elif isinstance(leaf, torch.Tensor):
                    result[r].append(leaf.detach())
                else:
                    result[r].append(leaf)
    return result
