"""Hugging Face transformers (5.x) models for `gg.Problem.from_modules`.

transformers' tensor parallelism (`transformers/distributed/tensor_parallel.py`) is DTensor based:
``from_pretrained(..., distributed_config=DistributedConfig(tp_size=W))`` builds the model, then
`prepare_distribute_model` (a device mesh over the process group) and `maybe_distribute_model`
(the model's ``tp_plan``: each parameter becomes a DTensor, each planned module's forward is wrapped
with its style's input/output redistributions). `distribute` does exactly those two calls, so a model
built from a config is distributed as `from_pretrained` distributes a checkpoint::

    from gg_notebook.adapters.transformers import distribute
    gg.Problem.from_modules(sequential=lambda: LlamaForCausalLM(cfg),
                            distributed=lambda: distribute(LlamaForCausalLM(cfg), tp=W), ...)

DTensor parameters carry their placements, which the core reads. What the adapter adds:

* ``shims()``: DTensor's sharding-propagation caches (the Python LRU caches and the C++ fast path)
  key on a ``DeviceMesh`` whose hash ignores the local rank; a model distributed in a process that
  already distributed one for another rank gets that rank's mesh (rank 1 then reads rank 0's
  coordinate and slices rank 0's part of every gradient). The shims start and end with empty caches.
* placements: every tensor transformers shards is a DTensor; the core reads its placement, including
  ``_StridedShard(dim, split_factor)`` of the ``packed_colwise`` / ``packed_rowwise`` styles (fused
  gate/up weights, each packed block sharded on its own), so ``placement()`` has nothing to add.
* ``grad_placement()``: parameters of modules with the ``replicated_with_grad_allreduce`` style
  (Qwen3's per-head q/k norms) have per-rank partial gradients; transformers sums them in a
  post-accumulate-grad hook, which ``torch.autograd.grad`` (what a verifier differentiates with)
  never runs, so their gradients are ``Partial()`` sums over the ranks.

transformers is imported only when a model of it is seen or `distribute` is called.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

import torch

PACKAGE = "transformers"
INSTALL = "pip install -c constraints.txt '.[hf]'"


class MissingPackage(ImportError):
    """transformers is not installed; the message gives the install command."""


def _require():
    try:
        import transformers  # noqa: F401
        from transformers.distributed import DistributedConfig  # noqa: F401
    except ImportError as exc:
        raise MissingPackage(
            f"gg_notebook's transformers adapter needs the `transformers` package (5.x, with "
            f"transformers.distributed), which is not importable here ({exc}). Install it with: {INSTALL}"
        ) from exc
    return transformers


def distribute(model: torch.nn.Module, tp: int, tp_plan: dict | None = None, **config: Any) -> torch.nn.Module:
    """``model`` tensor-parallel over the current process group, exactly as
    ``type(model).from_pretrained(..., distributed_config=DistributedConfig(tp_size=tp, tp_plan=tp_plan,
    **config))`` distributes it (`prepare_distribute_model` then `maybe_distribute_model`; loading a
    checkpoint afterwards only fills the shards). ``tp_plan`` overrides entries of the model's own plan
    (keys as in the model, e.g. ``"model.layers.*.self_attn.o_proj"``); ``{}`` switches TP off."""
    _require()
    from transformers.distributed import DistributedConfig

    kwargs = dict(config)
    if tp_plan is not None:
        kwargs["tp_plan"] = tp_plan
    dcfg = DistributedConfig(tp_size=tp, **kwargs)
    cls = type(model)
    dcfg, _device_map, mesh_manager = cls.prepare_distribute_model(dcfg)
    model = cls.maybe_distribute_model(model, dcfg, mesh_manager)
    _check_kv_heads(model, tp)
    return model


def _check_kv_heads(model, tp: int) -> None:
    """transformers splits a colwise k_proj/v_proj by output rows and has no KV-head replication:
    with ``num_key_value_heads`` not divisible by ``tp`` a rank would hold part of a head, and the
    model fails in its first forward with a bare reshape error. Say so where the model is built."""
    try:
        from transformers.distributed.tensor_parallel import get_kv_heads_per_rank
    except ImportError:  # pragma: no cover - older transformers
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None)
    plan = getattr(model, "tp_plan", None) or {}
    if heads is None or not plan or tp <= 1:
        return
    if get_kv_heads_per_rank(plan, heads, tp) is None:
        raise ValueError(
            f"num_key_value_heads={heads} is not divisible by tp={tp}: transformers' tp_plan shards k_proj/v_proj "
            f"'colwise' (by output rows, no KV-head replication), so each rank would hold a fraction of a head and the "
            f"first forward fails. Use a tp that divides {heads}, or a config with more KV heads.")


def _clear_dtensor_caches() -> None:
    if "torch.distributed.tensor" not in sys.modules:
        return
    try:
        torch._C._clear_DTensor_sharding_propagator_cache()
    except Exception:  # pragma: no cover - private API moved
        pass
    try:
        from torch.distributed.tensor import DTensor

        prop = DTensor._op_dispatcher.sharding_propagator
        prop.propagate_op_sharding.cache_clear()
        prop._propagate_tensor_meta_cached.cache_clear()
    except Exception:  # pragma: no cover - private API moved
        pass


def _module_styles(model) -> dict[str, str]:
    """{module name: tp style name} of the plan ``model`` was distributed with."""
    plan = getattr(model, "tp_plan", None) or {}
    if not plan:
        return {}
    try:
        from transformers.distributed.parallel_utils import _get_parameter_plan
    except ImportError:  # pragma: no cover
        return {}
    out = {}
    for name, mod in model.named_modules():
        if getattr(mod, "_is_hooked", False):
            style = _get_parameter_plan(name, plan, is_weight=False)
            if style is not None:
                out[name] = style
    return out


class _Adapter:
    name = "transformers"
    package = PACKAGE
    install = INSTALL

    def owns(self, model: torch.nn.Module) -> bool:
        return any(type(m).__module__.startswith("transformers.") for m in model.modules())

    @contextmanager
    def shims(self):
        _require()
        _clear_dtensor_caches()
        try:
            yield
        finally:
            _clear_dtensor_caches()

    def placement(self, model, name: str, local: torch.Tensor, global_shape: tuple, rank: int, world_size: int):
        # Every tensor transformers shards (tp_plan styles, expert parallelism) is a DTensor, whose
        # placement the core reads (``_StridedShard`` of the packed styles included); the others
        # (norm weights, rotary tables) are whole on every rank.
        return None

    def grad_placement(self, model, name, local, placement):
        module_name = name.rpartition(".")[0]
        if _module_styles(model).get(module_name) == "replicated_with_grad_allreduce":
            from torch.distributed.tensor import Partial

            return Partial()
        return None


ADAPTER = _Adapter()
