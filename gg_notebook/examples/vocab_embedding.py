"""Vocab-parallel embedding (Megatron's VocabParallelEmbedding).

The embedding table is split by vocabulary rows. Each rank looks up the tokens that fall in its
``[start, end)`` id range (others are redirected to row 0 and their rows zeroed) and an all-reduce
sums the ranks' lookups: exactly one rank contributes each token's row.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randint, randn, seeded
from ._tp import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    vocab_range_from_per_partition_vocab_size,
)
from ._types import Bug, Example


def embedding(ids, weight):
    """Single-device token embedding lookup; ids: [batch, seq] int64, weight: [vocab, hidden]."""
    return F.embedding(ids, weight)  # gg: lookup


def vocab_parallel_embedding(ids, weight, *, bug=None, sequence_parallel=False):
    """One rank of a vocab-parallel embedding; weight: [vocab/W, hidden] (this rank's rows), ids replicated.

    Returns the replicated [batch, seq, hidden] lookup, or with ``sequence_parallel`` this rank's block
    of the sequence [batch, seq/W, hidden]: the partial lookups are then reduce-scattered along the
    sequence instead of all-reduced (megatron-core's ``reduce_scatter_embeddings``).
    """
    rank = dist.get_rank()
    world_size = dist.get_world_size()
    per_partition = weight.shape[0]
    if bug == "wrong_rank_offset":
        rank = rank + 1  # 1-based rank from the launcher
    vocab_start, vocab_end = vocab_range_from_per_partition_vocab_size(per_partition, rank, world_size)
    input_mask = (ids < vocab_start) | (ids >= vocab_end)
    masked_input = ids.clone() - vocab_start
    masked_input[input_mask] = 0
    output_parallel = F.embedding(masked_input, weight)
    if bug != "missing_mask":
        output_parallel[input_mask, :] = 0.0
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(output_parallel, 1)
    return reduce_from_tensor_model_parallel_region(output_parallel)


BUGS = {
    b.name: b
    for b in (
        Bug("wrong_rank_offset",
            "The vocabulary range is computed from a 1-based rank, so each rank serves the ids of the "
            "next partition with its own rows (and the last rank serves none).",
            "aten.embedding", "lookup"),
        Bug("missing_mask",
            "Rows of tokens owned by other ranks are not zeroed after the lookup, so every rank adds "
            "row 0 of its partition for foreign tokens.",
            "aten.embedding", "lookup"),
    )
}


def make(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8, vocab: int = 64,
         hidden: int = 16, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("vocab_embedding", bug, BUGS)
    g = seeded(seed)
    ids = randint(g, vocab, batch, seq, device=device)
    weight = randn(g, vocab, hidden, dtype=dtype, device=device)
    return Problem(
        sequential=embedding,
        distributed=functools.partial(vocab_parallel_embedding, bug=bug),
        inputs=(ids, weight),
        placements=(Replicate(), Shard(0)),
        world_size=world_size,
        expect=(Replicate(),),
        name="vocab_embedding" if bug is None else f"vocab_embedding[{bug}]",
        input_names=("ids", "weight"),
    )


EXAMPLES = [
    Example("vocab_embedding", "Megatron vocab-parallel embedding: mask foreign ids, local lookup, "
            "zero foreign rows, all-reduce.", make, BUGS),
]
