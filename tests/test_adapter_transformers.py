"""transformers models through `gg.Problem.from_modules` (gg_notebook/adapters/transformers.py).

A tiny `LlamaForCausalLM` (GQA, RoPE, RMSNorm, SwiGLU, HF's loss) with its built-in tp_plan, applied
as ``from_pretrained(distributed_config=DistributedConfig(tp_size=W))`` applies it (`distribute`):
forward+backward of the loss at TP 2 and the logits at TP 4 are proved; a tp_plan entry that lays
gate_proj out differently from up_proj, and a RowwiseParallel whose output is never all-reduced, are
refuted at the transformers line where the wrong value is used; a plan whose shards do not fit is a
capture error naming the library line and the rank. Also: the per-process DTensor caches the shims
reset, partial gradients of ``replicated_with_grad_allreduce`` norms, the missing-package message.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

import gg_notebook as gg
from gg_notebook.capture import CaptureError

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -c constraints.txt '.[hf]')")
pytest.importorskip("transformers.distributed", reason="transformers >= 5 (transformers.distributed) is needed")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from gg_notebook.adapters.transformers import ADAPTER, MissingPackage, distribute  # noqa: E402

V, B, S = 128, 2, 8


def _cfg(kv_heads: int, attn: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                       attn_implementation=attn)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


def _llama(W, attn="sdpa", tp_plan=None, **kw):
    cfg = _cfg(2 if W == 2 else 4, attn)
    return gg.Problem.from_modules(
        sequential=lambda: LlamaForCausalLM(cfg),
        distributed=lambda: distribute(LlamaForCausalLM(cfg), tp=W, tp_plan=tp_plan),
        inputs=_batch(), placements=(gg.Replicate(), gg.Replicate()), world_size=W, **kw)


def _loss(m, ids, labels):
    return m(ids, labels=labels).loss


def test_llama_tp2_loss_forward_backward_is_proved():
    p = _llama(2, "sdpa", forward=_loss, grads=True)
    state = p.meta["from_modules"]["state"]
    assert state["model.layers.0.self_attn.o_proj.weight"].placement == gg.Shard(1)
    assert state["model.embed_tokens.weight"].placement == gg.Shard(0)
    assert state["model.norm.weight"].placement == gg.Replicate()
    r = gg.verify(p)
    assert r.status == gg.Status.PROVED, r


def test_llama_tp4_logits_forward_is_proved():
    p = _llama(4, "eager", forward=lambda m, ids, labels: m(ids).logits, expect=[gg.Replicate()])
    r = gg.verify(p)
    assert r.status == gg.Status.PROVED, r


def test_wrong_tp_plan_entry_is_refuted_at_the_mlp_line():
    # gate_proj packed (two blocks, each split over the ranks), up_proj split contiguously: the ranks
    # multiply features that do not belong together
    p = _llama(2, "sdpa", tp_plan={"model.layers.*.mlp.gate_proj": "packed_colwise"}, forward=_loss)
    assert isinstance(p.meta["from_modules"]["state"]["model.layers.0.mlp.gate_proj.weight"].placement, gg.Layout)
    r = gg.verify(p)
    assert r.status == gg.Status.REFUTED, r
    assert "transformers/models/llama/modeling_llama.py" in r.culprit.source, r.culprit
    assert "self.act_fn(self.gate_proj(x)) * self.up_proj(x)" in r.culprit.code, r.culprit


def test_rowwise_output_never_all_reduced_is_refuted_at_the_residual_add(monkeypatch):
    from transformers.distributed import tensor_parallel

    def no_reduce(self, module, output, mesh):
        return output.to_local()  # the bug: the partial sums of o_proj/down_proj are used as they are

    monkeypatch.setattr(tensor_parallel.RowwiseParallel, "transform_output_post_forward", no_reduce)
    r = gg.verify(_llama(2, "eager", forward=_loss))
    assert r.status == gg.Status.REFUTED, r
    assert "transformers/models/llama/modeling_llama.py" in r.culprit.source, r.culprit
    assert "residual + hidden_states" in r.culprit.code, r.culprit
    assert "per-rank partials" in r.culprit.detail and "self.o_proj(attn_output)" in r.culprit.detail, r.culprit


def test_plan_whose_shards_do_not_fit_names_the_library_line_and_rank():
    p = _llama(2, "sdpa", tp_plan={"model.layers.*.self_attn.o_proj": "colwise"}, forward=_loss)
    with pytest.raises(CaptureError) as e:
        gg.verify(p)
    assert "rank 0" in str(e.value) and "transformers/distributed/tensor_parallel.py" in str(e.value), e.value


def test_shims_give_each_rank_its_own_mesh_in_one_process():
    """DTensor's sharding caches key on a DeviceMesh whose hash ignores the rank: without the reset,
    rank 1's model built after rank 0's (one process) gets rank 0's mesh coordinate."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    coords = []
    for r in (0, 1):
        dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=2)
        try:
            with ADAPTER.shims():
                m = distribute(LlamaForCausalLM(_cfg(2, "eager")), tp=2)
                coords.append(m.model.embed_tokens.weight.device_mesh.get_coordinate())
        finally:
            dist.destroy_process_group()
    assert coords == [(0,), (1,)]


def test_replicated_with_grad_allreduce_norms_have_partial_gradients():
    """transformers sums these gradients in a post-accumulate-grad hook, which autograd.grad never runs."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with ADAPTER.shims():
            m = distribute(Qwen3ForCausalLM(cfg), tp=2)
            q = m.model.layers[0].self_attn.q_norm.weight
            assert ADAPTER.grad_placement(m, "model.layers.0.self_attn.q_norm.weight", q, gg.Replicate()) == gg.Partial()
            w = m.model.layers[0].input_layernorm.weight
            assert ADAPTER.grad_placement(m, "model.layers.0.input_layernorm.weight", w, gg.Replicate()) is None
    finally:
        dist.destroy_process_group()


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(MissingPackage, match=r"pip install -c constraints.txt '\.\[hf\]'"):
        distribute(torch.nn.Linear(2, 2), tp=2)
    with pytest.raises(MissingPackage):
        with ADAPTER.shims():
            pass


def test_kv_heads_not_divisible_by_tp_is_a_clear_error_where_the_model_is_built():
    cfg = _cfg(2, "sdpa")  # 2 KV heads, TP 4: transformers would split a head between ranks
    with pytest.raises(CaptureError, match=r"num_key_value_heads=2 is not divisible by tp=4") as e:
        gg.Problem.from_modules(
            sequential=lambda: LlamaForCausalLM(cfg), distributed=lambda: distribute(LlamaForCausalLM(cfg), tp=4),
            inputs=_batch(), placements=(gg.Replicate(), gg.Replicate()), world_size=4, forward=_loss)
    assert "building the model" in str(e.value)
