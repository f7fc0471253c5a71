# fuzz-seed: subject=example:vocab_cross_entropy@ignore_index world_size=2 dtype=float64 operator=none intent=baseline found=false_proof
# none  at line 0 of the specialized source; verdict then: proved; ground truth: output 0 on rank 0: max abs error 1 (scale 8.83)
"""Vocab-parallel cross-entropy (Megatron's ``vocab_parallel_cross_entropy``).

Logits are split along the vocabulary. The ranks agree on the row max (all-reduce MAX), each
gathers the target logit if it owns the target id, and all-reduces (SUM) the predicted logit and the
sum of exponentials: ``loss = log(sum_exp) - predicted``. Nothing of size vocab is communicated.
"""
from __future__ import annotations
import functools
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard
from gg_notebook.problem import Problem
from ._common import check_bug, randint, randn, seeded
from ._tp import vocab_range_from_per_partition_vocab_size
from ._types import Bug, Example

def cross_entropy(logits, target):
    """Single-device per-token cross-entropy; logits: [batch, seq, vocab], target: [batch, seq]."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.view(-1, vocab), target.view(-1), reduction='none')

class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's vocab-parallel cross-entropy with its hand-written backward."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, bug=None):
        logits_max = torch.max(vocab_parallel_logits, dim=-1)[0]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX)
        vocab_parallel_logits = vocab_parallel_logits - logits_max.unsqueeze(dim=-1)
        partition_vocab_size = vocab_parallel_logits.size(-1)
        rank = dist.get_rank()
        world_size = dist.get_world_size()
        vocab_start_index, vocab_end_index = vocab_range_from_per_partition_vocab_size(partition_vocab_size, rank, world_size)
        pass
        target_mask = (target < vocab_start_index) | (target >= vocab_end_index)
        masked_target = target.clone() - vocab_start_index
        masked_target[target_mask] = 0
        logits_2d = vocab_parallel_logits.view(-1, partition_vocab_size)
        masked_target_1d = masked_target.view(-1)
        arange_1d = torch.arange(start=0, end=logits_2d.size(0), device=logits_2d.device)
        predicted_logits_1d = logits_2d[arange_1d, masked_target_1d]
        predicted_logits_1d = predicted_logits_1d.clone().contiguous()
        predicted_logits = predicted_logits_1d.view_as(target)
        predicted_logits[target_mask] = 0.0
        dist.all_reduce(predicted_logits)
        exp_logits = torch.exp(vocab_parallel_logits)
        sum_exp_logits = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp_logits)
        loss = torch.log(sum_exp_logits) - predicted_logits
        exp_logits = exp_logits / sum_exp_logits.unsqueeze(dim=-1)
        ctx.save_for_backward(exp_logits, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        partition_vocab_size = softmax.size(-1)
        grad_input = softmax.clone()
        grad_2d = grad_input.view(-1, partition_vocab_size)
        arange_1d = torch.arange(start=0, end=grad_2d.size(0), device=grad_2d.device)
        softmax_update = 1.0 - target_mask.view(-1).to(grad_2d.dtype)
        grad_2d[arange_1d, masked_target_1d] -= softmax_update
        grad_input = grad_input * grad_output.unsqueeze(dim=-1)
        return (grad_input, None, None)

def vocab_parallel_cross_entropy(vocab_parallel_logits, target, bug=None):
    """Per-token loss [batch, seq] from this rank's vocabulary slice of the logits (target replicated)."""
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, bug)

def cross_entropy_tp(logits, target, *, bug=None):
    """One rank of vocab-parallel cross-entropy: logits [batch, seq, vocab/W], target replicated."""
    return vocab_parallel_cross_entropy(logits, target, bug).view(-1)
BUGS = {b.name: b for b in (Bug('local_max', 'The MAX all-reduce of the row max is missing: each rank shifts its logits by its own max, so the summed exponentials and the predicted logit use different shifts.', 'aten._log_softmax', 'cross_entropy'), Bug('wrong_rank_offset', 'Off-by-one vocabulary range: the last id of every partition is treated as foreign on all ranks, so its target logit is never gathered.', 'aten.nll_loss_forward', 'cross_entropy'))}

def make(world_size: int=2, bug: str | None=None, *, batch: int=2, seq: int=8, vocab: int=64, seed: int=0, dtype=torch.float64, device='cpu') -> Problem:
    check_bug('vocab_cross_entropy', bug, BUGS)
    g = seeded(seed)
    logits = randn(g, batch, seq, vocab, dtype=dtype, device=device, scale=2.0)
    target = randint(g, vocab, batch, seq, device=device)
    if str(device) != 'meta':
        target[:, -1] = vocab - 1
    return Problem(sequential=cross_entropy, distributed=functools.partial(cross_entropy_tp, bug=bug), inputs=(logits, target), placements=(Shard(-1), Replicate()), world_size=world_size, expect=(Replicate(),), name='vocab_cross_entropy' if bug is None else f'vocab_cross_entropy[{bug}]', input_names=('logits', 'target'))
EXAMPLES = [Example('vocab_cross_entropy', 'Megatron vocab-parallel cross-entropy: MAX all-reduce, masked target gather, SUM all-reduces of the predicted logit and of the exponentials.', make, BUGS)]
