"""Megatron-LM style tensor-parallel helpers shared by the examples.

These are the conjugate communication operators of Megatron's ``mappings.py`` written as
``torch.autograd.Function``s, plus the vocabulary range helper. They use the default process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _CopyToModelParallelRegion(torch.autograd.Function):
    """Identity in forward, all-reduce of the gradient in backward (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx, input_):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        grad_output = grad_output.contiguous()
        dist.all_reduce(grad_output)
        return grad_output


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """All-reduce in forward, identity in backward (Megatron's ``g``)."""

    @staticmethod
    def forward(ctx, input_):
        input_ = input_.contiguous()
        dist.all_reduce(input_)
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def copy_to_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    return _CopyToModelParallelRegion.apply(input_)


def reduce_from_tensor_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    return _ReduceFromModelParallelRegion.apply(input_)


def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size: int, rank, world_size: int):
    """``[first, last)`` ids of the vocabulary partition owned by ``rank``."""
    index_f = rank * per_partition_vocab_size
    index_l = index_f + per_partition_vocab_size
    return index_f, index_l


# ------------------------------------------------------------------------ sequence parallelism
# Megatron-SP keeps activations split along the sequence outside the tensor-parallel regions.
# megatron-core lays activations out [seq, batch, hidden] and gathers / reduce-scatters along the
# first dimension; the GPT examples here are [batch, seq, hidden], so the helpers take the sequence
# dimension ``dim``: the collective runs on a copy with ``dim`` moved to the front (the [seq, batch,
# hidden] buffer megatron-core would hold) and the result is moved back.


# How `_split_along_dim` takes the rank's block: "megatron" (megatron-core's spelling, a view of the
# block made contiguous) or "narrow_copy" (a copy of the block). Both are captured once (the rank's
# numbers sit in the view's arguments, or in narrow_copy's); the second is kept to compare them.
SPLIT_SPELLING = "megatron"


def _split_along_dim(input_: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's block of ``input_`` along ``dim`` (no communication)."""
    world_size = dist.get_world_size()
    if world_size == 1:
        return input_
    if input_.shape[dim] % world_size:
        raise ValueError(f"{input_.shape[dim]} is not divisible by {world_size}")
    local = input_.shape[dim] // world_size
    rank = dist.get_rank()
    if SPLIT_SPELLING == "narrow_copy":
        return torch.narrow_copy(input_, dim, rank * local, local)
    if dim % input_.dim() == 0:
        # megatron-core's _split_along_first_dim: a slice of the leading dimension
        return input_[rank * local:(rank + 1) * local].contiguous()
    # elsewhere (the sequence of a [batch, seq, hidden] activation), the spelling of megatron-core's
    # split_tensor_along_last_dim: torch.split, the rank's block, made contiguous
    return torch.split(input_, local, dim=dim)[rank].contiguous()


def _first_dim_copy(input_: torch.Tensor, dim: int) -> torch.Tensor:
    """``input_`` with ``dim`` moved to the front, as a fresh contiguous buffer for the collective.

    A copy, not ``.contiguous()``: at batch 1 the transposed view already counts as contiguous, so
    ``.contiguous()`` would hand on a view (to the collective here; to the matmuls after the gather,
    which then take their strided ``bmm`` path).
    """
    if dim % input_.dim() == 0:
        return input_.contiguous()
    return input_.transpose(0, dim).clone(memory_format=torch.contiguous_format)


def _from_first_dim(output: torch.Tensor, dim: int) -> torch.Tensor:
    """The collective's result with its first dimension moved back to ``dim``."""
    if dim % output.dim() == 0:
        return output
    return output.transpose(0, dim).clone(memory_format=torch.contiguous_format)


def _gather_along_dim(input_: torch.Tensor, dim: int) -> torch.Tensor:
    """All-gather the ranks' blocks and concatenate them along ``dim`` (in rank order)."""
    world_size = dist.get_world_size()
    if world_size == 1:
        return input_
    input_ = _first_dim_copy(input_, dim)
    size = list(input_.shape)
    size[0] *= world_size
    output = torch.empty(size, dtype=input_.dtype, device=input_.device)
    dist.all_gather_into_tensor(output, input_)
    return _from_first_dim(output, dim)


def _reduce_scatter_along_dim(input_: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum the ranks' tensors and keep this rank's block along ``dim``."""
    world_size = dist.get_world_size()
    if world_size == 1:
        return input_
    input_ = _first_dim_copy(input_, dim)
    size = list(input_.shape)
    size[0] //= world_size
    output = torch.empty(size, dtype=input_.dtype, device=input_.device)
    dist.reduce_scatter_tensor(output, input_)
    return _from_first_dim(output, dim)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Split along the sequence in forward, all-gather of the gradient in backward."""

    @staticmethod
    def forward(ctx, input_, dim):
        ctx.dim = dim
        return _split_along_dim(input_, dim)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_dim(grad_output, ctx.dim), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """All-gather along the sequence in forward. Backward: reduce-scatter when the consumer is
    tensor-parallel (each rank holds a partial input gradient), a plain split when the computation
    after the gather is duplicated on every rank (``tensor_parallel_output_grad=False``)."""

    @staticmethod
    def forward(ctx, input_, dim, tensor_parallel_output_grad=True):
        ctx.dim = dim
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_along_dim(input_, dim)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_along_dim(grad_output, ctx.dim), None, None
        return _split_along_dim(grad_output, ctx.dim), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Reduce-scatter along the sequence in forward, all-gather of the gradient in backward."""

    @staticmethod
    def forward(ctx, input_, dim):
        ctx.dim = dim
        return _reduce_scatter_along_dim(input_, dim)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_dim(grad_output, ctx.dim), None


def scatter_to_sequence_parallel_region(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return _ScatterToSequenceParallelRegion.apply(input_, dim)


def gather_from_sequence_parallel_region(input_: torch.Tensor, dim: int = 0,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    return _GatherFromSequenceParallelRegion.apply(input_, dim, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return _ReduceScatterToSequenceParallelRegion.apply(input_, dim)
