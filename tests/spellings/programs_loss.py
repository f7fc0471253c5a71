"""Spelling suite, pattern 6: the softmax and loss family.

Vocab-parallel cross-entropy (logits split along the vocabulary, targets replicated) written as
Megatron writes it (MAX all-reduce of the row max, exp, SUM all-reduce of the exponentials, masked
target gather, SUM all-reduce of the predicted logit), as a DTensor ``loss_parallel``-like
log_softmax, and with ``torch.logsumexp`` per shard combined across ranks; the reductions none / sum
/ mean, ``ignore_index`` with the mean over the kept tokens, label smoothing, z-loss; softmax and
log_softmax over a sharded last dim; the online-softmax merges of flash-decoding (per-shard (max,
sum) pairs) and ring attention (partial outputs with their log-sum-exp); forward and forward +
backward (``torch.autograd.grad`` inside both programs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnnf
import torch.nn.functional as F

import gg_notebook as gg

from ._case import SpellingCase, ri, rn

B, S, V = 2, 4, 16
IGNORE = -100
Z_COEF = 1e-4
SMOOTH = 0.1


def _logits(requires_grad=False):
    t = 2.0 * rn(B, S, V, seed=0)
    return t.requires_grad_(requires_grad)


def _target(with_ignored=False):
    t = ri(0, V, B, S, seed=1)
    t[0, -1] = V - 1  # the last id of the last partition
    t[1, 0] = 0
    if with_ignored:
        t[0, 1] = IGNORE
        t[1, 2] = IGNORE
    return t


_ce_in = lambda: [_logits(), _target()]  # noqa: E731
_ce_in_ign = lambda: [_logits(), _target(with_ignored=True)]  # noqa: E731
_ce_in_grad = lambda: [_logits(requires_grad=True), _target()]  # noqa: E731
CLASS_IDS = {"target": range(0, V)}

# ---------------------------------------------------------------------------------------------
# specs


def ce_none(logits, target):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), reduction="none")


def ce_none_bug_sum(logits, target):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), reduction="none")  # gg: sum


def ce_none_bug_offset(logits, target):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), reduction="none")  # gg: offset


def ce_mean(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def ce_sum(logits, target):
    return F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="sum")


def ce_ignore_mean(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE)


def ce_ignore_mean_bug(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE)  # gg: ignored-mean


def ce_label_smoothing(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none", label_smoothing=SMOOTH)


def ce_z_loss(logits, target):
    flat = logits.view(-1, V)
    ce = F.cross_entropy(flat, target.view(-1), reduction="none")
    return ce + Z_COEF * torch.logsumexp(flat, dim=-1).pow(2)


# ---------------------------------------------------------------------------------------------
# rank programs: logits [B, S, V/W], target [B, S] replicated


def _vocab_range(logits):
    part = logits.size(-1)
    start = dist.get_rank() * part
    return start, start + part


def ce_megatron(logits, target, *, bug=None):
    """Megatron's vocab_parallel_cross_entropy forward, written inline; per-token loss [B*S]."""
    logits_max = torch.max(logits, dim=-1)[0]
    dist.all_reduce(logits_max, op=dist.ReduceOp.MAX)
    logits = logits - logits_max.unsqueeze(dim=-1)

    vocab_start, vocab_end = _vocab_range(logits)
    target_mask = (target < vocab_start) | (target >= vocab_end)
    if bug == "offset":
        masked_target = target.clone()  # the partition offset is not subtracted
    else:
        masked_target = target.clone() - vocab_start
    masked_target[target_mask] = 0

    logits_2d = logits.view(-1, logits.size(-1))
    masked_target_1d = masked_target.view(-1)
    arange_1d = torch.arange(start=0, end=logits_2d.size(0), device=logits_2d.device)
    predicted_logits_1d = logits_2d[arange_1d, masked_target_1d]
    predicted_logits = predicted_logits_1d.clone().contiguous().view_as(target)
    predicted_logits[target_mask] = 0.0
    dist.all_reduce(predicted_logits)

    exp_logits = torch.exp(logits)
    sum_exp_logits = exp_logits.sum(dim=-1)
    if bug != "sum":
        dist.all_reduce(sum_exp_logits)
    loss = torch.log(sum_exp_logits) - predicted_logits
    return loss.view(-1)


def ce_megatron_rank(logits, target):
    return ce_megatron(logits, target)


def ce_megatron_missing_sum(logits, target):
    return ce_megatron(logits, target, bug="sum")  # BUG: sum_exp_logits is not all-reduced


def ce_megatron_no_offset(logits, target):
    return ce_megatron(logits, target, bug="offset")  # BUG: masked_target = target, no - vocab_start


def ce_none_bug_clamp(logits, target):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), reduction="none")  # gg: clamp


def ce_megatron_clamped_no_offset(logits, target):
    logits_max = torch.max(logits, dim=-1)[0]
    dist.all_reduce(logits_max, op=dist.ReduceOp.MAX)
    logits = logits - logits_max.unsqueeze(dim=-1)
    vocab_start, vocab_end = _vocab_range(logits)
    target_mask = (target < vocab_start) | (target >= vocab_end)
    masked_target = target.clamp(0, logits.size(-1) - 1)  # BUG: clamped into range, offset never subtracted
    predicted = torch.gather(logits, -1, masked_target.unsqueeze(-1)).squeeze(-1)
    predicted = predicted.masked_fill(target_mask, 0.0)
    dist.all_reduce(predicted)
    sum_exp = torch.exp(logits).sum(dim=-1)
    dist.all_reduce(sum_exp)
    return (torch.log(sum_exp) - predicted).view(-1)


def ce_loss_parallel(logits, target):
    """DTensor loss_parallel-like: a distributed log_softmax, then a masked gather of -log p."""
    m = logits.amax(dim=-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = logits - m
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM)
    log_probs = shifted - sum_exp.log()

    part = logits.shape[-1]
    lo = dist.get_rank() * part
    local = target - lo
    outside = (local < 0) | (local >= part)
    local = torch.where(outside, torch.zeros_like(local), local)
    picked = torch.gather(log_probs, -1, local.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(outside, torch.zeros_like(picked), picked)
    dist.all_reduce(picked)
    return -picked.flatten()


def ce_logsumexp_gather(logits, target):
    """Each shard's torch.logsumexp, all-gathered and combined; the target logit via one_hot."""
    world = dist.get_world_size()
    part = logits.size(-1)
    lse_local = torch.logsumexp(logits, dim=-1)
    lses = [torch.empty_like(lse_local) for _ in range(world)]
    dist.all_gather(lses, lse_local)
    lse = torch.logsumexp(torch.stack(lses, dim=0), dim=0)

    start = dist.get_rank() * part
    in_range = (target >= start) & (target < start + part)
    idx = (target - start).clamp(0, part - 1)
    onehot = F.one_hot(idx, part).to(logits.dtype) * in_range.unsqueeze(-1).to(logits.dtype)
    tgt = (logits * onehot).sum(-1)
    dist.all_reduce(tgt)
    return (lse - tgt).reshape(-1)


def ce_mean_rank(logits, target):
    return ce_megatron(logits, target).mean()


def ce_sum_rank(logits, target):
    return ce_loss_parallel(logits, target).sum()


def ce_mean_sum_div_rank(logits, target):
    loss = ce_logsumexp_gather(logits, target)
    return loss.sum() / target.numel()


def ce_ignore_rank(logits, target):
    # -100 is below every partition's start, so the masked gather already yields 0 for it
    loss = ce_megatron(logits, target)
    keep = (target.view(-1) != IGNORE).to(loss.dtype)
    return (loss * keep).sum() / keep.sum()


def ce_ignore_rank_masked_mean(logits, target):
    loss = ce_loss_parallel(logits, target)
    valid = target.view(-1) != IGNORE
    return loss[valid].mean()


def ce_ignore_rank_where(logits, target):
    loss = ce_logsumexp_gather(logits, target)
    valid = target.flatten().ne(IGNORE)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss.sum() / valid.sum().clamp(min=1)


def ce_ignore_rank_all_tokens(logits, target):
    loss = ce_megatron(logits, target)
    loss = loss.masked_fill(target.view(-1) == IGNORE, 0.0)
    return loss.mean()  # BUG: divides by every token, ignored ones included


def _lse_and_target_logit(logits, target):
    m = logits.max(dim=-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    se = torch.exp(logits - m).sum(-1)
    dist.all_reduce(se)
    lse = se.log() + m.squeeze(-1)
    start, end = _vocab_range(logits)
    mask = (target < start) | (target >= end)
    idx = (target - start).masked_fill(mask, 0)
    t = logits.gather(-1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(mask, 0.0)
    dist.all_reduce(t)
    return lse, t


def ce_label_smoothing_rank(logits, target):
    lse, t = _lse_and_target_logit(logits, target)
    nll = lse - t
    total = logits.sum(-1)
    dist.all_reduce(total)
    smooth = lse - total / (logits.size(-1) * dist.get_world_size())  # mean of -log p over the vocab
    return ((1.0 - SMOOTH) * nll + SMOOTH * smooth).view(-1)


def ce_label_smoothing_rank_logp(logits, target):
    m = logits.amax(-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    se = (logits - m).exp().sum(-1, keepdim=True)
    dist.all_reduce(se)
    logp = logits - m - se.log()
    start, end = _vocab_range(logits)
    mask = (target < start) | (target >= end)
    idx = torch.where(mask, 0, target - start)
    nll = -logp.gather(-1, idx[..., None])[..., 0] * (~mask)
    smooth = -logp.sum(-1)
    both = torch.stack([nll, smooth])
    dist.all_reduce(both)
    nll, smooth = both[0], both[1] / V
    return ((1 - SMOOTH) * nll + SMOOTH * smooth).flatten()


def ce_label_smoothing_spec_bug(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none",  # gg: smooth
                           label_smoothing=SMOOTH)


def ce_label_smoothing_rank_local_v(logits, target):
    lse, t = _lse_and_target_logit(logits, target)
    total = logits.sum(-1)
    dist.all_reduce(total)
    smooth = lse - total / logits.size(-1)  # BUG: divided by this rank's vocab slice, not the vocab
    return ((1.0 - SMOOTH) * (lse - t) + SMOOTH * smooth).view(-1)


def ce_z_loss_rank(logits, target):
    lse, t = _lse_and_target_logit(logits, target)
    return (lse - t + Z_COEF * lse ** 2).view(-1)


def ce_z_loss_rank_square(logits, target):
    loss = ce_megatron(logits, target)
    world = dist.get_world_size()
    lse_local = torch.logsumexp(logits, dim=-1)
    lses = torch.empty(world, *lse_local.shape, dtype=lse_local.dtype)
    dist.all_gather_into_tensor(lses, lse_local.contiguous())
    lse = lses.logsumexp(0).view(-1)
    return loss + Z_COEF * torch.square(lse)


# ---------------------------------------------------------------------------------------------
# softmax / log_softmax over a sharded last dim (output stays sharded)


def softmax_spec(x):
    return torch.softmax(x, dim=-1)


def softmax_spec_bug(x):
    return torch.softmax(x, dim=-1)  # gg: local-sum


def log_softmax_spec(x):
    return F.log_softmax(x, dim=-1)


def softmax_rank_max_sum(x):
    m = x.max(dim=-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    e = torch.exp(x - m)
    s = e.sum(dim=-1, keepdim=True)
    dist.all_reduce(s)
    return e / s


def softmax_rank_no_max(x):
    e = x.exp()
    denom = e.sum(-1, keepdim=True)
    dist.all_reduce(denom, op=dist.ReduceOp.SUM)
    return e / denom


def softmax_rank_lse(x):
    world = dist.get_world_size()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    lses = [torch.empty_like(lse) for _ in range(world)]
    dist.all_gather(lses, lse)
    return torch.exp(x - torch.logsumexp(torch.cat(lses, dim=-1), dim=-1, keepdim=True))


def log_softmax_rank(x):
    m = x.amax(-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    s = (x - m).exp().sum(-1, keepdim=True)
    dist.all_reduce(s)
    return x - m - s.log()


def softmax_rank_local_sum(x):
    m = x.max(dim=-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    e = torch.exp(x - m)
    return e / e.sum(dim=-1, keepdim=True)  # BUG: the SUM all-reduce of the denominator is missing


# ---------------------------------------------------------------------------------------------
# online softmax: attention with the keys/values split along the sequence (flash-decoding), q
# replicated; the ranks merge their partial results

NH, SQ, SK, D = 2, 2, 8, 4


def attn_spec(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v


def attn_spec_bug(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v  # gg: no-rescale


def flash_decoding_rank(q, k, v):
    """Per-shard (max, sum, unnormalized output), all-gathered as lists and merged."""
    world = dist.get_world_size()
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)  # noqa: E741
    o = p @ v
    ms, ls, os_ = ([torch.empty_like(t) for _ in range(world)] for t in (m, l, o))
    dist.all_gather(ms, m)
    dist.all_gather(ls, l)
    dist.all_gather(os_, o)
    ms, ls, os_ = torch.stack(ms), torch.stack(ls), torch.stack(os_)
    m_glob = ms.max(dim=0, keepdim=True).values
    alpha = torch.exp(ms - m_glob)
    return (os_ * alpha).sum(0) / (ls * alpha).sum(0)


def flash_decoding_rank_allreduce(q, k, v):
    """The same merge with two all-reduces: MAX of the row max, then SUM of rescaled partials."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    m = s.max(dim=-1, keepdim=True)[0]
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    p = (s - m).exp()
    num = p @ v
    den = p.sum(-1, keepdim=True)
    dist.all_reduce(num)
    dist.all_reduce(den)
    return num / den


def ring_lse_rank(q, k, v):
    """Ring-attention style: each shard's normalized output and its log-sum-exp, merged."""
    world = dist.get_world_size()
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    out = torch.exp(s - lse) @ v
    outs = [torch.empty_like(out) for _ in range(world)]
    lses = [torch.empty_like(lse) for _ in range(world)]
    dist.all_gather(outs, out)
    dist.all_gather(lses, lse)
    lse_all = torch.logsumexp(torch.stack(lses), dim=0)
    return sum(o * torch.exp(l - lse_all) for o, l in zip(outs, lses))


def ring_sigmoid_rank(q, k, v):
    """Ring-flash-attention's incremental update: out -= sigmoid(blse - lse) * (out - bout)."""
    world = dist.get_world_size()
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    block_lse = s.logsumexp(-1, keepdim=True)
    block_out = F.softmax(s, dim=-1) @ v
    outs = [torch.empty_like(block_out) for _ in range(world)]
    lses = [torch.empty_like(block_lse) for _ in range(world)]
    dist.all_gather(outs, block_out)
    dist.all_gather(lses, block_lse)
    out, lse = outs[0], lses[0]
    for bo, bl in zip(outs[1:], lses[1:]):
        out = out - torch.sigmoid(bl - lse) * (out - bo)
        lse = lse - F.logsigmoid(lse - bl)
    return out


def flash_decoding_rank_no_rescale(q, k, v):
    world = dist.get_world_size()
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)  # noqa: E741
    o = p @ v
    ls, os_ = ([torch.empty_like(t) for _ in range(world)] for t in (l, o))
    dist.all_gather(ls, l)
    dist.all_gather(os_, o)
    return torch.stack(os_).sum(0) / torch.stack(ls).sum(0)  # BUG: each shard's max is never reconciled


def _qkv_decode():
    return [rn(B, NH, SQ, D, seed=3), rn(B, NH, SK, D, seed=4), rn(B, NH, SK, D, seed=5)]


# ---------------------------------------------------------------------------------------------
# forward + backward: the loss and d loss / d logits, inside both programs


def ce_mean_fwd_bwd(logits, target):
    loss = F.cross_entropy(logits.view(-1, V), target.view(-1))
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


def ce_mean_fwd_bwd_bug(logits, target):
    loss = F.cross_entropy(logits.view(-1, V), target.view(-1))  # gg: grad-scale
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


class _VocabParallelCE(torch.autograd.Function):
    """Megatron's hand-written forward and backward."""

    @staticmethod
    def forward(ctx, logits, target, bug=None):
        logits_max = torch.max(logits, dim=-1)[0]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX)
        logits = logits - logits_max.unsqueeze(-1)
        start, end = _vocab_range(logits)
        target_mask = (target < start) | (target >= end)
        masked_target = target.clone() - start
        masked_target[target_mask] = 0
        logits_2d = logits.view(-1, logits.size(-1))
        masked_target_1d = masked_target.view(-1)
        arange_1d = torch.arange(logits_2d.size(0))
        predicted = logits_2d[arange_1d, masked_target_1d].clone().contiguous().view_as(target)
        predicted[target_mask] = 0.0
        dist.all_reduce(predicted)
        exp_logits = torch.exp(logits)
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp)
        loss = torch.log(sum_exp) - predicted
        softmax = exp_logits / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        ctx.bug = bug
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_input = softmax.clone()
        grad_2d = grad_input.view(-1, softmax.size(-1))
        arange_1d = torch.arange(grad_2d.size(0))
        update = 1.0 - target_mask.view(-1).to(grad_2d.dtype)
        grad_2d[arange_1d, masked_target_1d] -= update
        if ctx.bug != "grad-scale":
            grad_input = grad_input * grad_output.unsqueeze(-1)
        return grad_input, None, None


def ce_fwd_bwd_megatron(logits, target):
    loss = _VocabParallelCE.apply(logits, target).mean()
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


def ce_fwd_bwd_megatron_bug(logits, target):
    loss = _VocabParallelCE.apply(logits, target, "grad-scale").mean()  # BUG: backward ignores grad_output
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


def ce_mean_fwd_bwd_bug_dnn(logits, target):
    loss = F.cross_entropy(logits.view(-1, V), target.view(-1))  # gg: dnn-grad
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


class _ReduceFromRegion(torch.autograd.Function):
    """Megatron's ``g``: all-reduce in forward, identity in backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def ce_fwd_bwd_reduce_region(logits, target):
    """Plain autograd; the two SUM all-reduces go through an identity-backward region."""
    m = logits.detach().amax(-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = logits - m
    sum_exp = _ReduceFromRegion.apply(shifted.exp().sum(-1))
    start, end = _vocab_range(logits)
    mask = (target < start) | (target >= end)
    idx = (target - start).masked_fill(mask, 0)
    picked = _ReduceFromRegion.apply(shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * (~mask))
    loss = (sum_exp.log() - picked).mean()
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


def ce_fwd_bwd_differentiable_collectives(logits, target):
    """torch.distributed.nn.functional.all_reduce: its backward all-reduces the gradient again, so
    every rank's copy of the (replicated) loss contributes: d logits comes out world_size times too big."""
    m = logits.detach().amax(-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)  # a constant shift: no gradient needed
    shifted = logits - m
    sum_exp = dnnf.all_reduce(shifted.exp().sum(-1))  # BUG: backward all-reduces the gradient
    start, end = _vocab_range(logits)
    mask = (target < start) | (target >= end)
    idx = (target - start).masked_fill(mask, 0)
    picked = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * (~mask)
    picked = dnnf.all_reduce(picked)
    loss = (sum_exp.log() - picked).mean()
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


def ce_fwd_bwd_softmax_minus_onehot(logits, target):
    """The gradient written out by hand: (softmax - onehot) / N, no autograd on the rank."""
    m = logits.amax(-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    e = (logits - m).exp()
    se = e.sum(-1, keepdim=True)
    dist.all_reduce(se)
    start, end = _vocab_range(logits)
    mask = (target < start) | (target >= end)
    idx = (target - start).masked_fill(mask, 0)
    onehot = F.one_hot(idx, logits.size(-1)).to(logits.dtype) * (~mask).unsqueeze(-1)
    t = (logits * onehot).sum(-1)
    dist.all_reduce(t)
    n = target.numel()
    loss = (se.squeeze(-1).log() + m.squeeze(-1) - t).sum() / n
    grad = (e / se - onehot) / n
    return loss, grad


# ---------------------------------------------------------------------------------------------

# more spellings of the mechanisms of issue #8 item 6 (one-hot target picks, the mean over kept
# tokens, label smoothing over a split vocabulary, online-softmax merges), each with a bug


def ce_none_bug_onehot(logits, target):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), reduction="none")  # gg: onehot


def ce_onehot_arange_rank(logits, target):
    """The target logit via a comparison with arange (rows of out-of-shard ids are zero already)."""
    part = logits.shape[-1]
    lo = dist.get_rank() * part
    m = logits.detach().max(-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    se = torch.sum(torch.exp(logits - m), dim=-1)
    dist.all_reduce(se)
    hit = (torch.arange(part) == (target - lo).unsqueeze(-1)).to(logits.dtype)
    tgt = (hit * logits).sum(dim=-1)
    dist.all_reduce(tgt)
    return (se.log() + m.squeeze(-1) - tgt).flatten()


def ce_onehot_no_offset_rank(logits, target):
    part = logits.shape[-1]
    m = logits.amax(-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    se = torch.exp(logits - m).sum(-1)
    dist.all_reduce(se)
    hit = F.one_hot(target.clamp(0, part - 1), part).to(logits.dtype)  # BUG: the shard's first id is not subtracted
    tgt = (logits * hit).sum(-1)
    dist.all_reduce(tgt)
    return (se.log() + m.squeeze(-1) - tgt).reshape(-1)


def ce_ignore_rank_nonneg_count(logits, target):
    """-100 is the only negative id nll_loss accepts: the kept tokens are the non-negative ones."""
    loss = ce_logsumexp_gather(logits, target)
    loss = loss.masked_fill(target.view(-1) == IGNORE, 0.0)
    return loss.sum() / (target >= 0).sum()


def ce_ignore_mean_bug_pad(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE)  # gg: pad-count


def ce_ignore_rank_pad_count(logits, target):
    loss = ce_megatron(logits, target)
    keep = target.view(-1) != IGNORE
    return torch.where(keep, loss, 0.0).sum() / keep.sum()


def ce_ignore_rank_pad_count_bug(logits, target):
    loss = ce_megatron(logits, target)
    keep = target.view(-1) != IGNORE
    return torch.where(keep, loss, 0.0).sum() / (target != 0).sum()  # BUG: counts the kept tokens as "not pad id 0"


def ce_label_smoothing_rank_mean_logp(logits, target):
    """Smoothing term written as the mean over the vocabulary of -log p: (V * lse - sum(x)) / V."""
    lse, t = _lse_and_target_logit(logits, target)
    total = logits.sum(dim=-1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    vocab = logits.shape[-1] * dist.get_world_size()
    smooth = (lse * vocab - total) / vocab
    return torch.add((1 - SMOOTH) * (lse - t), smooth, alpha=SMOOTH).reshape(-1)


def ce_label_smoothing_spec_bug_local_sum(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none",  # gg: smooth-sum
                           label_smoothing=SMOOTH)


def ce_label_smoothing_rank_local_sum(logits, target):
    lse, t = _lse_and_target_logit(logits, target)
    total = logits.sum(dim=-1)  # BUG: this shard's logits only, the SUM all-reduce is missing
    smooth = lse - total / V
    return ((1 - SMOOTH) * (lse - t) + SMOOTH * smooth).reshape(-1)


def lse_allreduce_rank(q, k, v):
    """Normalized per-shard outputs with their logsumexp, merged by a MAX then two SUM all-reduces."""
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.size(-1))
    lse = s.logsumexp(dim=-1, keepdim=True)
    out = torch.softmax(s, dim=-1) @ v
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    w = torch.exp(lse - m)
    num = out * w
    dist.all_reduce(num)
    dist.all_reduce(w)
    return num / w


def attn_spec_bug_weights(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v  # gg: first-block


def ring_lse_rank_first_block_weights(q, k, v):
    world = dist.get_world_size()
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    out = torch.exp(s - lse) @ v
    outs = [torch.empty_like(out) for _ in range(world)]
    lses = [torch.empty_like(lse) for _ in range(world)]
    dist.all_gather(outs, out)
    dist.all_gather(lses, lse)
    return sum(o * torch.exp(l - lses[0]) for o, l in zip(outs, lses))  # BUG: weights relative to block 0, not normalized


def ce_sum_fwd_bwd(logits, target):
    loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="sum")
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


def ce_mean_fwd_bwd_bug_count(logits, target):
    loss = F.cross_entropy(logits.view(-1, V), target.view(-1))  # gg: wrong-count
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


def _region_loss_terms(logits, target):
    """log(sum exp) and the target logit, all-reduced through Megatron's identity-backward region."""
    m = logits.detach().max(dim=-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    shifted = logits - m
    sum_exp = _ReduceFromRegion.apply(torch.exp(shifted).sum(dim=-1))
    start, end = _vocab_range(logits)
    inside = (target >= start) & (target < end)
    idx = torch.where(inside, target - start, torch.zeros_like(target))
    picked = torch.where(inside, torch.gather(shifted, -1, idx[..., None])[..., 0], 0.0)
    return torch.log(sum_exp), _ReduceFromRegion.apply(picked)


def ce_fwd_bwd_region_sum(logits, target):
    lse, picked = _region_loss_terms(logits, target)
    loss = torch.sum(lse - picked)
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


def ce_fwd_bwd_region_seq_count(logits, target):
    lse, picked = _region_loss_terms(logits, target)
    loss = (lse - picked).sum() / target.size(-1)  # BUG: divided by the sequence length, not the token count
    (grad,) = torch.autograd.grad(loss, [logits])
    return loss, grad


# ---------------------------------------------------------------------------------------------

R, SL = gg.Replicate(), gg.Shard(-1)
SEQ = gg.Shard(2)


def _c(name, spec, rank, inputs, placements, expect, *, bug=False, world_size=2, note="", marker="# BUG",
       missing=None, culprit=None, twin=None, domains=None, assumed=()):
    return SpellingCase(name=name, pattern="loss", sequential=spec, distributed=rank, inputs=inputs,
                        placements=placements, world_size=world_size, expect=expect, bug=bug, note=note,
                        marker=marker, missing=missing, culprit=culprit, twin=twin, domains=domains,
                        assumed=tuple(assumed))



# boolean-mask selections reduced at once (capture/masked_select.py): loss[mask].mean() & co.


def ce_ignore_mean_bug_select_pad(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE)  # gg: select-pad


def ce_ignore_mean_bug_select_all(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE)  # gg: select-all


def ce_ignore_mean_bug_numel_all(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE)  # gg: numel-all


def ce_ignore_sum(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE, reduction="sum")


def ce_ignore_sum_bug(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE, reduction="sum")  # gg: sum-all


def ce_ignore_rank_masked_select_mean(logits, target):
    loss = ce_megatron(logits, target)
    keep = target.view(-1) != IGNORE
    return torch.masked_select(loss, keep).mean()


def ce_ignore_rank_masked_select_mean_pad(logits, target):
    loss = ce_megatron(logits, target)
    keep = target.view(-1) != 0  # BUG: keeps the tokens whose id is not 0 (a pad id), not those != -100
    return torch.masked_select(loss, keep).mean()


def ce_ignore_rank_nonzero_sum_div_count(logits, target):
    loss = ce_logsumexp_gather(logits, target)
    valid = target.reshape(-1).ne(IGNORE)
    return loss[valid.nonzero(as_tuple=True)].sum() / valid.sum()


def ce_ignore_rank_nonzero_sum_div_all(logits, target):
    loss = ce_logsumexp_gather(logits, target)
    valid = target.reshape(-1).ne(IGNORE)
    return loss[valid.nonzero(as_tuple=True)].sum() / loss.numel()  # BUG: divides by every token


def ce_ignore_rank_hf_index_numel(logits, target):
    """Hugging Face style: the per-token loss of the kept labels, its sum over its own numel."""
    loss = ce_loss_parallel(logits, target)
    kept = loss[target.flatten() != IGNORE]
    return kept.sum() / kept.numel()


def ce_ignore_rank_hf_index_numel_bug(logits, target):
    loss = ce_loss_parallel(logits, target)
    kept = loss[target.flatten() != -1]  # BUG: the wrong ignore value: ignored tokens are kept (loss = their lse)
    return kept.sum() / kept.numel()


def ce_ignore_rank_index_sum(logits, target):
    loss = ce_megatron(logits, target)
    return loss[target.view(-1) >= 0].sum()


def ce_ignore_rank_index_sum_bug(logits, target):
    loss = ce_megatron(logits, target)
    return loss[target.view(-1) >= -100].sum()  # BUG: >= -100 keeps the ignored tokens too


# the count of kept tokens clamped to 1 (engine/clamped_count.py): the same value as the spec's mean
# only when some target is kept (else the spec is 0/0 = NaN and the ranks 0): "assumed", not proved
ASSUME_KEPT = "at least one element of target is != -100"
CLAMP_NOTE = "assumed, not proved: with every target ignored the spec is 0/0 = NaN and the ranks return 0"


def ce_ignore_mean_bug_clamp_pad(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE)  # gg: clamp-pad


def ce_ignore_mean_bug_clamp_all(logits, target):
    return F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=IGNORE)  # gg: clamp-all


def ce_ignore_rank_clamp_min(logits, target):
    loss = ce_megatron(logits, target)
    keep = target.view(-1) != IGNORE
    n = keep.sum()
    return torch.where(keep, loss, 0.0).sum() / torch.clamp_min(n, 1)


def ce_ignore_rank_clamp_min_pad(logits, target):
    loss = ce_megatron(logits, target)
    keep = target.view(-1) != IGNORE
    n = (target != 0).sum()  # BUG: counts the tokens that are not pad id 0
    return torch.where(keep, loss, 0.0).sum() / torch.clamp_min(n, 1)


def ce_ignore_rank_maximum_ones(logits, target):
    loss = ce_loss_parallel(logits, target)
    keep = (target.reshape(-1) != IGNORE).to(loss.dtype)
    n = keep.sum()
    return (loss * keep).sum() / torch.maximum(n, torch.ones_like(n))


def ce_ignore_rank_maximum_ones_all(logits, target):
    loss = ce_loss_parallel(logits, target)
    keep = (target.reshape(-1) != IGNORE).to(loss.dtype)
    n = torch.ones_like(keep).sum()  # BUG: every token, not the kept ones
    return (loss * keep).sum() / torch.maximum(n, torch.ones_like(n))


def ce_ignore_rank_positional_clamp(logits, target):
    loss = ce_logsumexp_gather(logits, target).masked_fill(target.view(-1) == IGNORE, 0.0)
    denom = target.ge(0).sum().clamp(1)
    return loss.sum() / denom

_sm_in = lambda: [2.0 * rn(B, S, V, seed=7)]  # noqa: E731

CASES = [
    # vocab-parallel cross-entropy, reduction="none"
    _c("vocab-ce/megatron-none", ce_none, ce_megatron_rank, _ce_in, [SL, R], [R], domains=CLASS_IDS),
    _c("vocab-ce/loss-parallel-log_softmax-none", ce_none, ce_loss_parallel, _ce_in, [SL, R], [R],
       domains=CLASS_IDS),
    _c("vocab-ce/logsumexp-allgather-onehot-none", ce_none, ce_logsumexp_gather, _ce_in, [SL, R], [R],
       domains=CLASS_IDS),
    _c("vocab-ce/megatron-none-tp4", ce_none, ce_megatron_rank, _ce_in, [SL, R], [R], domains=CLASS_IDS,
       world_size=4),
    _c("vocab-ce/bug-missing-sum-exp-allreduce", ce_none_bug_sum, ce_megatron_missing_sum, _ce_in, [SL, R], [R],
       domains=CLASS_IDS, bug=True, culprit="sum", twin="vocab-ce/megatron-none",
       note="sum_exp is not all-reduced: each rank normalizes over its own vocabulary slice"),
    _c("vocab-ce/bug-target-offset-not-subtracted", ce_none_bug_offset, ce_megatron_no_offset, _ce_in,
       [SL, R], [R], domains=CLASS_IDS, bug=True, culprit="offset", twin="vocab-ce/megatron-none",
       note="masked_target = target (the partition's vocab_start is not subtracted): rank 1 indexes "
            "past its slice and raises on real inputs"),
    _c("vocab-ce/bug-target-clamped-no-offset", ce_none_bug_clamp, ce_megatron_clamped_no_offset, _ce_in,
       [SL, R], [R], domains=CLASS_IDS, bug=True, culprit="clamp", twin="vocab-ce/megatron-none",
       note="target.clamp(0, part - 1) without subtracting vocab_start: rank 1 picks its last logit"),
    # reductions
    _c("vocab-ce/megatron-mean", ce_mean, ce_mean_rank, _ce_in, [SL, R], [R], domains=CLASS_IDS),
    _c("vocab-ce/loss-parallel-sum", ce_sum, ce_sum_rank, _ce_in, [SL, R], [R], domains=CLASS_IDS),
    _c("vocab-ce/logsumexp-sum-div-numel", ce_mean, ce_mean_sum_div_rank, _ce_in, [SL, R], [R],
       domains=CLASS_IDS),
    # ignore_index, mean over the kept tokens
    _c("vocab-ce-ignore/megatron-keep-weighted-sum", ce_ignore_mean, ce_ignore_rank, _ce_in_ign, [SL, R], [R]),
    _c("vocab-ce-ignore/loss-parallel-boolean-index-mean", ce_ignore_mean, ce_ignore_rank_masked_mean,
       _ce_in_ign, [SL, R], [R]),
    _c("vocab-ce-ignore/logsumexp-where-clamp", ce_ignore_mean, ce_ignore_rank_where, _ce_in_ign, [SL, R], [R],
       assumed=[ASSUME_KEPT], note=CLAMP_NOTE),
    _c("vocab-ce-ignore/bug-mean-over-all-tokens", ce_ignore_mean_bug, ce_ignore_rank_all_tokens, _ce_in_ign,
       [SL, R], [R], bug=True, culprit="ignored-mean", twin="vocab-ce-ignore/megatron-keep-weighted-sum",
       note="ignored tokens are zeroed but still counted in the mean's denominator"),
    # the kept count clamped to 1: assumed (at least one target kept), not proved
    _c("vocab-ce-ignore/where-clamp_min-count", ce_ignore_mean, ce_ignore_rank_clamp_min, _ce_in_ign, [SL, R], [R],
       assumed=[ASSUME_KEPT], note=CLAMP_NOTE),
    _c("vocab-ce-ignore/bug-clamp_min-of-pad-count", ce_ignore_mean_bug_clamp_pad, ce_ignore_rank_clamp_min_pad,
       _ce_in_ign, [SL, R], [R], bug=True, culprit="clamp-pad", twin="vocab-ce-ignore/where-clamp_min-count",
       note="clamp(min=1) of the wrong count: targets != 0 (a pad id), not targets != ignore_index"),
    _c("vocab-ce-ignore/keep-weighted-maximum-ones", ce_ignore_mean, ce_ignore_rank_maximum_ones, _ce_in_ign,
       [SL, R], [R], assumed=[ASSUME_KEPT], note=CLAMP_NOTE),
    _c("vocab-ce-ignore/bug-maximum-of-all-tokens", ce_ignore_mean_bug_clamp_all, ce_ignore_rank_maximum_ones_all,
       _ce_in_ign, [SL, R], [R], bug=True, culprit="clamp-all", twin="vocab-ce-ignore/keep-weighted-maximum-ones",
       note="the guarded divisor counts every token (ones_like(keep).sum()), ignored ones included"),
    _c("vocab-ce-ignore/masked_fill-nonneg-clamp-positional", ce_ignore_mean, ce_ignore_rank_positional_clamp,
       _ce_in_ign, [SL, R], [R], assumed=["at least one element of target is >= 0"], note=CLAMP_NOTE),
    # boolean-mask selections reduced at once: loss[mask].mean(), masked_select, nonzero(as_tuple=True)
    _c("vocab-ce-ignore/masked_select-mean", ce_ignore_mean, ce_ignore_rank_masked_select_mean, _ce_in_ign,
       [SL, R], [R]),
    _c("vocab-ce-ignore/bug-masked_select-pad-id", ce_ignore_mean_bug_select_pad,
       ce_ignore_rank_masked_select_mean_pad, _ce_in_ign, [SL, R], [R], bug=True, culprit="select-pad",
       twin="vocab-ce-ignore/masked_select-mean",
       note="the mask keeps targets != 0 (a pad id) instead of targets != ignore_index"),
    _c("vocab-ce-ignore/nonzero-tuple-sum-div-count", ce_ignore_mean, ce_ignore_rank_nonzero_sum_div_count,
       _ce_in_ign, [SL, R], [R]),
    _c("vocab-ce-ignore/bug-nonzero-tuple-sum-div-all", ce_ignore_mean_bug_select_all,
       ce_ignore_rank_nonzero_sum_div_all, _ce_in_ign, [SL, R], [R], bug=True, culprit="select-all",
       twin="vocab-ce-ignore/nonzero-tuple-sum-div-count",
       note="the kept tokens' loss summed, then divided by every token (ignored ones included)"),
    _c("vocab-ce-ignore/hf-bool-index-sum-div-numel", ce_ignore_mean, ce_ignore_rank_hf_index_numel, _ce_in_ign,
       [SL, R], [R]),
    _c("vocab-ce-ignore/bug-hf-bool-index-wrong-ignore-value", ce_ignore_mean_bug_numel_all,
       ce_ignore_rank_hf_index_numel_bug, _ce_in_ign, [SL, R], [R], bug=True, culprit="numel-all",
       twin="vocab-ce-ignore/hf-bool-index-sum-div-numel",
       note="labels != -1 keeps the ignored tokens, whose vocab-parallel loss is their log-sum-exp"),
    _c("vocab-ce-ignore/bool-index-nonneg-sum", ce_ignore_sum, ce_ignore_rank_index_sum, _ce_in_ign, [SL, R], [R]),
    _c("vocab-ce-ignore/bug-bool-index-sum-keeps-ignored", ce_ignore_sum_bug, ce_ignore_rank_index_sum_bug,
       _ce_in_ign, [SL, R], [R], bug=True, culprit="sum-all", twin="vocab-ce-ignore/bool-index-nonneg-sum",
       note="target >= -100 is True for every target: the ignored tokens' loss is summed too"),
    # label smoothing, z-loss
    _c("vocab-ce-reg/smoothing-sum-logits-allreduce", ce_label_smoothing, ce_label_smoothing_rank, _ce_in, [SL, R], [R],
       domains=CLASS_IDS),
    _c("vocab-ce-reg/smoothing-log-probs-stacked-allreduce", ce_label_smoothing, ce_label_smoothing_rank_logp, _ce_in,
       [SL, R], [R], domains=CLASS_IDS),
    _c("vocab-ce-reg/bug-smoothing-local-vocab-size", ce_label_smoothing_spec_bug, ce_label_smoothing_rank_local_v,
       _ce_in, [SL, R], [R], domains=CLASS_IDS, bug=True, culprit="smooth",
       twin="vocab-ce-reg/smoothing-sum-logits-allreduce",
       note="the smoothing term's mean over the vocabulary divides by V/W"),
    _c("vocab-ce-reg/zloss-lse-squared", ce_z_loss, ce_z_loss_rank, _ce_in, [SL, R], [R], domains=CLASS_IDS),
    _c("vocab-ce-reg/zloss-megatron-plus-gathered-logsumexp", ce_z_loss, ce_z_loss_rank_square, _ce_in, [SL, R],
       [R], domains=CLASS_IDS),
    # softmax / log_softmax over a sharded last dim
    _c("sharded-softmax/max-sum-allreduce", softmax_spec, softmax_rank_max_sum, _sm_in, [SL], [SL]),
    _c("sharded-softmax/no-max-sum-allreduce", softmax_spec, softmax_rank_no_max, _sm_in, [SL], [SL]),
    _c("sharded-softmax/gathered-logsumexp", softmax_spec, softmax_rank_lse, _sm_in, [SL], [SL]),
    _c("sharded-softmax/log_softmax-max-sum-allreduce", log_softmax_spec, log_softmax_rank, _sm_in, [SL], [SL]),
    _c("sharded-softmax/bug-local-denominator", softmax_spec_bug, softmax_rank_local_sum, _sm_in, [SL], [SL],
       bug=True, culprit="local-sum", twin="sharded-softmax/max-sum-allreduce", note="the denominator's SUM all-reduce is missing"),
    # online softmax merges (keys/values split along the sequence)
    _c("online-softmax/flash-decoding-gather-merge", attn_spec, flash_decoding_rank, _qkv_decode,
       [R, SEQ, SEQ], [R]),
    _c("online-softmax/max-then-sum-allreduce", attn_spec, flash_decoding_rank_allreduce, _qkv_decode,
       [R, SEQ, SEQ], [R]),
    _c("online-softmax/ring-lse-merge", attn_spec, ring_lse_rank, _qkv_decode, [R, SEQ, SEQ], [R]),
    _c("online-softmax/ring-sigmoid-update", attn_spec, ring_sigmoid_rank, _qkv_decode, [R, SEQ, SEQ], [R],
       world_size=4),
    _c("online-softmax/bug-no-rescale", attn_spec_bug, flash_decoding_rank_no_rescale, _qkv_decode,
       [R, SEQ, SEQ], [R], bug=True, culprit="no-rescale", twin="online-softmax/flash-decoding-gather-merge",
       note="partial numerators and denominators summed without the exp(m_r - M) rescaling"),
    # forward + backward
    _c("vocab-ce-grad/megatron-autograd-function", ce_mean_fwd_bwd, ce_fwd_bwd_megatron, _ce_in_grad, [SL, R],
       [R, SL], domains=CLASS_IDS),
    _c("vocab-ce-grad/reduce-region-autograd", ce_mean_fwd_bwd, ce_fwd_bwd_reduce_region, _ce_in_grad, [SL, R],
       [R, SL], domains=CLASS_IDS),
    _c("vocab-ce-grad/softmax-minus-onehot", ce_mean_fwd_bwd, ce_fwd_bwd_softmax_minus_onehot, _ce_in_grad,
       [SL, R], [R, SL], domains=CLASS_IDS),
    _c("vocab-ce-grad/bug-grad-not-scaled", ce_mean_fwd_bwd_bug, ce_fwd_bwd_megatron_bug, _ce_in_grad, [SL, R],
       [R, SL], domains=CLASS_IDS, bug=True, culprit="grad-scale", twin="vocab-ce-grad/megatron-autograd-function",
       note="the hand-written backward drops grad_output (the mean's 1/N)"),
    _c("vocab-ce-grad/bug-dnn-all_reduce-backward", ce_mean_fwd_bwd_bug_dnn, ce_fwd_bwd_differentiable_collectives,
       _ce_in_grad, [SL, R], [R, SL], domains=CLASS_IDS, bug=True, culprit="dnn-grad", twin="vocab-ce-grad/reduce-region-autograd",
       note="torch.distributed.nn.functional.all_reduce sums the gradient over ranks in backward: "
            "d logits is world_size times the true gradient"),
    # one-hot target picks, the mean over kept tokens, smoothing, online softmax: more spellings
    _c("vocab-ce/arange-compare-pick-none", ce_none, ce_onehot_arange_rank, _ce_in, [SL, R], [R], domains=CLASS_IDS),
    _c("vocab-ce/arange-compare-pick-none-tp4", ce_none, ce_onehot_arange_rank, _ce_in, [SL, R], [R],
       domains=CLASS_IDS, world_size=4),
    _c("vocab-ce/bug-onehot-no-offset", ce_none_bug_onehot, ce_onehot_no_offset_rank, _ce_in, [SL, R], [R],
       domains=CLASS_IDS, bug=True, culprit="onehot", twin="vocab-ce/arange-compare-pick-none",
       note="one_hot(target.clamp(...)) without subtracting the shard's first id: rank 1 picks the wrong logit"),
    _c("vocab-ce-ignore/masked_fill-nonneg-count", ce_ignore_mean, ce_ignore_rank_nonneg_count, _ce_in_ign,
       [SL, R], [R]),
    _c("vocab-ce-ignore/where-bool-count", ce_ignore_mean, ce_ignore_rank_pad_count, _ce_in_ign, [SL, R], [R]),
    _c("vocab-ce-ignore/bug-count-not-pad-zero", ce_ignore_mean_bug_pad, ce_ignore_rank_pad_count_bug, _ce_in_ign,
       [SL, R], [R], bug=True, culprit="pad-count", twin="vocab-ce-ignore/where-bool-count",
       note="the divisor counts targets != 0 (a pad id) instead of targets != ignore_index"),
    _c("vocab-ce-reg/smoothing-mean-neg-logp-tp4", ce_label_smoothing, ce_label_smoothing_rank_mean_logp, _ce_in,
       [SL, R], [R], domains=CLASS_IDS, world_size=4),
    _c("vocab-ce-reg/bug-smoothing-sum-not-all-reduced", ce_label_smoothing_spec_bug_local_sum,
       ce_label_smoothing_rank_local_sum, _ce_in, [SL, R], [R], domains=CLASS_IDS, bug=True, culprit="smooth-sum",
       twin="vocab-ce-reg/smoothing-sum-logits-allreduce",
       note="the smoothing term sums this shard's logits only"),
    _c("online-softmax/lse-max-allreduce-einsum", attn_spec, lse_allreduce_rank, _qkv_decode, [R, SEQ, SEQ], [R]),
    _c("online-softmax/flash-decoding-gather-merge-tp4", attn_spec, flash_decoding_rank, _qkv_decode,
       [R, SEQ, SEQ], [R], world_size=4),
    _c("online-softmax/bug-weights-relative-to-first-block", attn_spec_bug_weights, ring_lse_rank_first_block_weights,
       _qkv_decode, [R, SEQ, SEQ], [R], bug=True, culprit="first-block", twin="online-softmax/ring-lse-merge",
       note="each block weighted by exp(lse_r - lse_0): the weights do not sum to one"),
    _c("vocab-ce-grad/region-autograd-sum-where", ce_sum_fwd_bwd, ce_fwd_bwd_region_sum, _ce_in_grad, [SL, R],
       [R, SL], domains=CLASS_IDS),
    _c("vocab-ce-grad/bug-mean-over-sequence-length", ce_mean_fwd_bwd_bug_count, ce_fwd_bwd_region_seq_count,
       _ce_in_grad, [SL, R], [R, SL], domains=CLASS_IDS, bug=True, culprit="wrong-count",
       twin="vocab-ce-grad/reduce-region-autograd",
       note="the mean divides by the sequence length (the batch dim forgotten), not the number of tokens"),
]

_MISSING: dict = {}

import dataclasses as _dc  # noqa: E402

CASES = [_dc.replace(c, missing=_MISSING[c.name]) if c.name in _MISSING else c for c in CASES]
assert set(_MISSING) <= {c.name for c in CASES}
