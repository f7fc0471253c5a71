"""torchtitan (0.3.x) llama3 with torchtitan's own TP / SP / loss-parallel, through Problem.from_modules.

Tiny configs (2 layers, hidden 64, vocab 128, batch 2 x 8); the whole file runs in well under a
minute and a half here. Skipped when torchtitan (and its spmd_types) is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

import gg_notebook as gg

_MISSING = [p for p in ("torchtitan", "spmd_types") if importlib.util.find_spec(p) is None]
needs_titan = pytest.mark.skipif(
    bool(_MISSING), reason=f"{' and '.join(_MISSING)} not installed: pip install -c constraints.txt '.[titan]'")


def _batch(seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 8), generator=g), torch.randint(0, vocab, (2, 8), generator=g)


def _problem(W, sp, grads, distributed=None, backend="spmd_types"):
    from gg_notebook.adapters import torchtitan as tt

    cfg = tt.llama3_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=W, vocab_size=128)
    tokens, labels = _batch()
    return gg.Problem.from_modules(
        sequential=lambda: tt.build(cfg, tp=1, backend=backend),
        distributed=distributed(cfg) if distributed else (lambda: tt.build(cfg, tp=W, sp=sp, backend=backend)),
        inputs=(tokens, labels), placements=(gg.Replicate(), gg.Replicate()), world_size=W,
        forward=tt.loss, grads=grads)


@needs_titan
def test_tp2_sequence_parallel_loss_and_grads_proved():
    problem = _problem(2, sp=True, grads=True)
    state = problem.meta["from_modules"]["state"]
    # spmd_types shardings read from the modules: fused QKV / w1 / w3 / embeddings / lm_head rows,
    # wo / w2 columns, norms replicated with partial gradients (sequence parallel), RoPE table replicated
    assert isinstance(state["layers.0.attention.qkv_linear.wqkv.weight"].placement, gg.Shard)
    assert state["layers.0.attention.qkv_linear.wqkv.weight"].placement.dim == 0
    assert state["layers.1.feed_forward.w2.weight"].placement.dim == 1
    assert isinstance(state["norm.weight"].placement, gg.Replicate)
    assert isinstance(state["norm.weight"].grad_placement, gg.Partial)
    assert state["layers.0.attention.rope.cache"].dtype == torch.complex64
    r = gg.verify(problem)
    assert r.status == "proved", r


@needs_titan
def test_tp4_sequence_parallel_loss_and_grads_proved():
    r = gg.verify(_problem(4, sp=True, grads=True))
    assert r.status == "proved", r


@needs_titan
def test_tp2_without_sequence_parallel_norm_grads_replicated():
    problem = _problem(2, sp=False, grads=False)
    state = problem.meta["from_modules"]["state"]
    assert isinstance(state["norm.weight"].grad_placement, gg.Replicate)  # spmd_types I: not partial
    r = gg.verify(problem)
    assert r.status == "proved", r


@needs_titan
def test_tp2_sequence_parallel_partial_dtensor_backend_proved():
    # DTensor parameters: placements read by the core; their gradients come back full (Replicate)
    problem = _problem(2, sp=True, grads=True, backend="partial_dtensor")
    state = problem.meta["from_modules"]["state"]
    assert state["norm.weight"].source == "DTensor" and isinstance(state["norm.weight"].grad_placement, gg.Replicate)
    r = gg.verify(problem)
    assert r.status == "proved", r


def _reduction_dropped(module):
    """A wrong sharding config on one module: its output declared replicated (R) on the TP axis
    instead of partial (P), so torchtitan skips the reduction of the row-parallel output."""

    def make(cfg, device="cpu"):
        def build():
            import spmd_types as spmd

            from gg_notebook.adapters import torchtitan as tt

            model = tt.build(cfg, tp=2, sp=True, device=device)
            mod = model.get_submodule(module)
            sc = mod._sharding_config
            src = sc.out_src_shardings
            axes = {k: (spmd.R if getattr(k, "value", k) == "tp" else v) for k, v in src.axis_types.items()}
            mod._sharding_config = dataclasses.replace(sc, out_src_shardings=dataclasses.replace(src, axis_types=axes))
            return model
        return build
    return make


@needs_titan
def test_wrong_sharding_config_refuted_at_the_library_line():
    r = gg.verify(_problem(2, sp=True, grads=False, distributed=_reduction_dropped("layers.1.feed_forward.w2")))
    assert r.status == "refuted", r
    # the first wrong value: layer 1's residual add of the unreduced feed-forward output
    assert "torchtitan/models/llama3/model.py:49" in str(r.culprit), r.culprit


def test_missing_package_message(monkeypatch):
    from gg_notebook.adapters import torchtitan as tt

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchtitan" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install -c constraints.txt '.\[titan\]'"):
        tt.llama3_config()
