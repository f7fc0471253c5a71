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
