"""torchtitan models built with parameters on the meta device (``tt.build(..., device="meta")``), and
``Problem.from_modules`` on meta models: the verdicts are the ones the same models get with real
weights (tiny shapes), and nothing of a meta model's size is allocated.

Skipped when torchtitan (and its spmd_types) is not installed (the last test needs neither).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import gg_notebook as gg
from gg_notebook.adapters.modules import ModelError
from test_adapter_torchtitan import _batch, _reduction_dropped, needs_titan  # written once


def _problem(device, W=2, sp=True, grads=True, distributed=None, layers=2):
    from gg_notebook.adapters import torchtitan as tt

    cfg = tt.llama3_config(dim=64, n_layers=layers, n_heads=4, n_kv_heads=W, vocab_size=128)
    tokens, labels = _batch()
    return gg.Problem.from_modules(
        sequential=lambda: tt.build(cfg, tp=1, device=device),
        distributed=distributed(cfg, device) if distributed else (lambda: tt.build(cfg, tp=W, sp=sp, device=device)),
        inputs=(tokens, labels), placements=(gg.Replicate(), gg.Replicate()), world_size=W,
        forward=tt.loss, grads=grads)


@needs_titan
@pytest.mark.parametrize("grads", [False, True], ids=["loss", "loss_and_grads"])
def test_meta_parameters_same_verdict_as_real_weights(grads):
    real, meta = _problem("cpu", grads=grads), _problem("meta", grads=grads)
    assert real.input_names == meta.input_names
    by_name = dict(zip(meta.input_names, meta.inputs))
    state = meta.meta["from_modules"]["state"]
    for name, info in state.items():
        t = by_name[name]
        assert t.shape == dict(zip(real.input_names, real.inputs))[name].shape, name
        # parameters shape-only; the RoPE table is still computed by torchtitan, with the real build's values
        assert t.device.type == ("meta" if info.kind == "parameter" else "cpu"), name
    rope = "layers.0.attention.rope.cache"
    assert torch.equal(by_name[rope], dict(zip(real.input_names, real.inputs))[rope])
    assert [p for p in meta.placements] == [p for p in real.placements]
    r_real, r_meta = gg.verify(real), gg.verify(meta)
    assert r_real.status == r_meta.status == "proved", (r_real, r_meta)


@needs_titan
def test_meta_wrong_sharding_refuted_at_the_same_line_as_real():
    wrong = _reduction_dropped("layers.1.attention.wo")
    r_real = gg.verify(_problem("cpu", grads=False, distributed=wrong))
    r_meta = gg.verify(_problem("meta", grads=False, distributed=wrong))
    assert r_real.status == r_meta.status == "refuted", (r_real, r_meta)
    assert str(r_meta.culprit) == str(r_real.culprit)
    assert "torchtitan/models/llama3/model.py" in str(r_meta.culprit), r_meta.culprit


def _other_rope_theta(cfg, device):
    def build():
        from gg_notebook.adapters import torchtitan as tt

        c = copy.deepcopy(cfg)
        for layer in c.layers:
            layer.attention.rope.theta = 10000.0  # the ranks' RoPE table differs from the sequential one
        return tt.build(c, tp=2, sp=True, device=device)
    return build


@needs_titan
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_rank_rope_table_still_compared_on_meta(device):
    # buffers are computed for real even with meta parameters: a rank computing another table is caught
    with pytest.raises(ModelError, match=r"rope\.cache holds values .* differ from the sequential model's"):
        gg.verify(_problem(device, grads=False, distributed=_other_rope_theta, layers=1))


@needs_titan
def test_build_rejects_other_devices():
    from gg_notebook.adapters import torchtitan as tt

    cfg = tt.llama3_config(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128)
    with pytest.raises(ValueError, match=r"device='cuda'.*'cpu'.*'meta'"):
        tt.build(cfg, tp=1, device="cuda")


class _Column(nn.Module):
    """A column-parallel linear (no bias) whose weight is built on the meta device: 8192 x 65536 x
    fp32 would be 2 GiB."""

    def __init__(self, out_features):
        super().__init__()
        with torch.device("meta"):
            self.proj = nn.Linear(65536, out_features, bias=False)

    def forward(self, x):
        return self.proj(x)


class _Doubled(_Column):
    def forward(self, x):
        return self.proj(x) * 2


def test_from_modules_keeps_a_meta_model_meta():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    W = 2
    x = torch.randn(2, 65536)
    problem = gg.Problem.from_modules(
        sequential=lambda: _Column(8192), distributed=lambda: _Column(8192 // W), inputs=(x,),
        placements=(gg.Replicate(),), world_size=W, param_placements={"proj.weight": gg.Shard(0)},
        expect=[gg.Shard(1)])
    w = dict(zip(problem.input_names, problem.inputs))["proj.weight"]
    assert w.device.type == "meta" and tuple(w.shape) == (8192, 65536)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # under 512 MiB (KiB units)
    assert gg.verify(problem).status == "proved"
    # a wrong rank program (its output doubled) is not proved; at this size no counterexample is run
    wrong = gg.Problem.from_modules(
        sequential=lambda: _Column(8192), distributed=lambda: _Doubled(8192 // W), inputs=(x,),
        placements=(gg.Replicate(),), world_size=W, param_placements={"proj.weight": gg.Shard(0)},
        expect=[gg.Shard(1)])
    assert gg.verify(wrong).status == "unknown"


class _SmallColumn(nn.Module):
    def __init__(self, out_features, device):
        super().__init__()
        self.proj = nn.Linear(64, out_features, bias=False, device=device)

    def forward(self, x):
        return torch.matmul(x, self.proj.weight.t())


class _SmallDoubled(_SmallColumn):
    def forward(self, x):
        return 2 * self.proj(x)


@pytest.mark.parametrize("rank_model,status", [(_SmallColumn, "proved"), (_SmallDoubled, "refuted")])
def test_from_modules_meta_verdict_and_culprit_as_real(rank_model, status):
    x = torch.randn(2, 64)
    results = {}
    for device in ("cpu", "meta"):
        problem = gg.Problem.from_modules(
            sequential=lambda: _SmallColumn(16, device), distributed=lambda: rank_model(8, device), inputs=(x,),
            placements=(gg.Replicate(),), world_size=2, param_placements={"proj.weight": gg.Shard(0)},
            expect=[gg.Shard(1)])
        results[device] = gg.verify(problem)
    assert results["cpu"].status == results["meta"].status == status, results
    assert str(results["cpu"].culprit) == str(results["meta"].culprit)


class _ColumnLoss(nn.Module):
    def __init__(self, out_features):
        super().__init__()
        self.proj = nn.Linear(64, out_features, bias=False)

    def forward(self, x):
        return self.proj(x).sum()


def test_from_modules_grads_captured_once():
    # the backward's first call (autograd.grad in gg_notebook's adapter) has no user frame inside the rank
    # program; sites stop at the recorder's entry, so make_fx's generated wrapper is never taken for one
    # (the 405B-shaped torchtitan model's forward+backward traced 8 ranks instead of 1 before)
    W = 2
    problem = gg.Problem.from_modules(
        sequential=lambda: _ColumnLoss(16), distributed=lambda: _ColumnLoss(16 // W), inputs=(torch.randn(2, 64),),
        placements=(gg.Replicate(),), world_size=W, param_placements={"proj.weight": gg.Shard(0)},
        grads=True, expect=[gg.Partial()])
    r = gg.verify(problem)
    assert r.status == "proved", r
    assert r.stats["capture"]["traced"] == 1 and r.stats["capture"]["specialized"] == W - 1, r.stats["capture"]


@needs_titan
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_rope_tables_computed_once_per_build_are_each_layers_own(device):
    # tt.build computes each distinct RoPE table once per build (every layer holds one): each layer's
    # table equals torchtitan's own computation for that layer's config, and is its own tensor
    import copy as _copy

    from gg_notebook.adapters import torchtitan as tt
    from gg_notebook.capture.tracing import fake_process_group

    cfg = tt.llama3_config(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128)
    cfg.layers[2] = _copy.deepcopy(cfg.layers[2])
    cfg.layers[2].attention.rope.theta = 10000  # one layer with another table
    with fake_process_group(0, 1):
        model = tt.build(cfg, tp=1, device=device)
    caches = [layer.attention.rope.cache for layer in model.layers.values()]
    for layer, cache in zip(model.layers.values(), caches):
        assert cache.device.type == "cpu"
        with torch.device("cpu"):
            want = layer.attention.rope._precompute_cache()  # torchtitan's, after the build
        assert torch.equal(cache, want)
    assert not torch.equal(caches[2], caches[0]) and torch.equal(caches[1], caches[0])
    assert len({c.data_ptr() for c in caches}) == len(caches)  # no layer shares another's storage
