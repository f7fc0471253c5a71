"""Attention spellings that meet only through the real-number normal forms of issue #8 item 7:
``_safe_softmax`` vs ``softmax`` (relations/safe_softmax.py), masks by value (lemmas/attn_mask.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gg_notebook as gg

B, H, S, D = 2, 4, 6, 4
SH = gg.Shard(1)


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _keep(full_row: bool):
    """A fixed, irregular boolean mask built inside the programs (constants are values)."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    keep = ((3 * i + 5 * j) % 7 != 0) | (j == 0)
    if full_row:
        keep = keep & (i != 2)  # query 2 sees no key: softmax gives NaN, SDPA's safe softmax gives 0
    return keep


def _problem(full_row: bool):
    def spec(q, k, v):
        keep = _keep(full_row)
        s = (q @ k.transpose(-2, -1) / D ** 0.5).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v

    def ranks(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_keep(full_row))

    return gg.Problem(spec, ranks, _qkv(), [SH, SH, SH], 2, expect=[SH])


def test_sdpa_bool_mask_vs_masked_fill_softmax_proved():
    r = gg.verify(_problem(False), capture="inprocess")
    assert r.status == "proved", str(r)


def test_fully_masked_row_is_not_proved():
    """softmax of an all -inf row is NaN, SDPA's is 0: the safe-softmax normal form must not apply."""
    r = gg.verify(_problem(True), capture="inprocess")
    assert r.status != "proved", str(r)


def test_bitwise_mode_keeps_safe_softmax():
    r = gg.verify(_problem(False), capture="inprocess", exact="bitwise")
    assert r.status != "proved", str(r)
