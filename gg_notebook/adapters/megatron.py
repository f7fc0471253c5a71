"""megatron-core models in `gg.Problem.from_modules`: shims, parameter layouts, gradient layouts.

A megatron-core user writes one builder and calls it twice::

    import gg_notebook as gg
    from gg_notebook.adapters.megatron import initialize

    def build(tp):
        initialize(tp=tp)                       # parallel_state for this process's (fake) group
        return GPTModel(config=TransformerConfig(..., tensor_model_parallel_size=tp), ...)

    problem = gg.Problem.from_modules(sequential=lambda: build(1), distributed=lambda: build(2), ...)

Everything megatron-specific lives here and megatron is imported only when a megatron model is
seen (`ADAPTER.owns`) or `initialize` is called:

- `shims()` makes megatron-core 0.16 build and trace on CPU under a fake process group, changing no
  arithmetic: ``torch.cuda.current_device()`` is "cpu" (megatron allocates its sequence-parallel
  buffers and gathered tensors there), the default causal mask is built on CPU, the global memory
  buffer and the rotary-embedding lru cache start empty (a tensor cached by one trace must not leak
  into the next), the dropout RNG tracker is megatron's inference tracker (its fork is a no-op;
  dropout itself is governed by ``Problem.random``), and the plain-PyTorch norm of the local layer spec
  accepts ``sequence_parallel`` and marks its weight as apex/TE's sequence-parallel norms do (the
  per-token norm computes the same with tokens sharded). All of it is restored on exit.
- `placement()` reads megatron's own metadata, set by ``_initialize_affine_weight_cpu/gpu``:
  ``tensor_model_parallel``, ``partition_dim`` and ``partition_stride``. Stride 1 is ``Shard(dim)``;
  stride s > 1 (the SwiGLU ``linear_fc1``: each rank holds ``[gate_r; up_r]``) is the `gg.Layout` that
  splits the global tensor into ``s * tp`` blocks along ``dim`` and gives rank r blocks
  ``r, r + tp, ...`` concatenated - exactly megatron's split.
- `grad_placement()`: a parameter marked ``sequence_parallel`` (the norms, and RowParallelLinear's
  bias, under sequence parallelism) has a partial gradient on each rank (its tokens' share; megatron's
  ``finalize_model_grads`` all-reduces it later): ``Partial()``.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from gg_notebook.problem import Layout, ProblemError

_INSTALL = "pip install -c constraints.txt '.[megatron]'"


def _require():
    """Import megatron.core or raise an ImportError that says how to install it."""
    from gg_notebook.adapters.frameworks import require

    require("einops", _INSTALL, "gg_notebook's megatron adapter (megatron-core needs einops)")
    require("megatron.core.parallel_state", _INSTALL, "gg_notebook's megatron adapter")
    return sys.modules["megatron.core"]


def initialize(tp: int = 1, **kwargs) -> None:
    """Initialize megatron's ``parallel_state`` with tensor-parallel size ``tp`` on the current
    (fake) process group, afresh: any previous model-parallel state of this process is destroyed first.

    Call it at the start of the builder passed to ``Problem.from_modules`` (``tp=1`` in the sequential
    builder, ``tp=W`` in the distributed one). Extra keyword arguments go to
    ``parallel_state.initialize_model_parallel`` (e.g. ``pipeline_model_parallel_size``)."""
    _require()
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    if not dist.is_initialized():
        raise ProblemError(
            "gg_notebook.adapters.megatron.initialize(tp=...) needs a process group: call it inside the builder "
            "you pass to gg.Problem.from_modules (gg_notebook creates a fake process group for every program)."
        )
    W = dist.get_world_size()
    if W % tp:
        raise ProblemError(
            f"initialize(tp={tp}) in a program with world size {W}: the tensor-parallel size must divide the "
            f"number of ranks (world_size={W}); use tp={W} in the distributed builder and tp=1 in the sequential one."
        )
    parallel_state.destroy_model_parallel()
    kwargs.setdefault("create_gloo_process_groups", False)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, **kwargs)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


# --------------------------------------------------------------------------------------------------
# shims


def _sp_torch_norm(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                   normalization="LayerNorm"):
    """``WrappedTorchNorm`` that accepts ``sequence_parallel``: the same torch norm, its parameters
    marked ``sequence_parallel`` (their gradients are per-rank partial sums, as with apex/TE norms)."""
    for flag, what in ((config.layernorm_zero_centered_gamma, "zero_centered_gamma"),
                       (config.persist_layer_norm, "persist_layer_norm"),
                       (config.memory_efficient_layer_norm, "memory_efficient_layer_norm")):
        if flag:
            raise ProblemError(f"megatron's WrappedTorchNorm does not support {what}: turn it off in the TransformerConfig.")
    kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
    if config.normalization not in kinds:
        raise ProblemError(f"megatron's WrappedTorchNorm does not support normalization={config.normalization!r}.")
    norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
    if config.sequence_parallel:
        for p in norm.parameters():
            p.sequence_parallel = True
    return norm


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


@contextmanager
def _patched(obj, name, value) -> Iterator[None]:
    missing = object()
    old = obj.__dict__.get(name, missing) if isinstance(obj, type) else getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


@contextmanager
def shims() -> Iterator[None]:
    """Patch megatron-core (and ``torch.cuda.current_device``) for CPU tracing; restore on exit."""
    _require()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils
    from megatron.core.utils import GlobalMemoryBuffer

    with ExitStack() as stack:
        stack.enter_context(_patched(torch.cuda, "current_device", lambda: "cpu"))
        # A fresh (empty) buffer: megatron caches sequence-parallel gather buffers in it.
        stack.enter_context(_patched(parallel_state, "_GLOBAL_MEMORY_BUFFER",
                                     GlobalMemoryBuffer() if parallel_state._GLOBAL_MEMORY_BUFFER is not None else None))
        stack.enter_context(_patched(mrandom, "_CUDA_RNG_STATE_TRACKER", mrandom._CUDA_RNG_STATE_TRACKER))
        stack.enter_context(_patched(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
                                     mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED))
        mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        stack.enter_context(_patched(tutils, "get_default_causal_mask", _cpu_causal_mask))
        softmax = sys.modules.get("megatron.core.fusions.fused_softmax")
        if softmax is None:
            try:
                from megatron.core.fusions import fused_softmax as softmax
            except ImportError:  # pragma: no cover - megatron without that module
                softmax = None
        if softmax is not None and hasattr(softmax, "get_default_causal_mask"):
            stack.enter_context(_patched(softmax, "get_default_causal_mask", _cpu_causal_mask))
        try:
            from megatron.core.transformer.torch_norm import WrappedTorchNorm
        except ImportError:  # pragma: no cover
            WrappedTorchNorm = None
        if WrappedTorchNorm is not None:
            stack.enter_context(_patched(WrappedTorchNorm, "__new__", _sp_torch_norm))
        rotary = _rotary_forward()
        if rotary is not None:
            rotary.cache_clear()
            stack.callback(rotary.cache_clear)
        yield


def _rotary_forward():
    try:
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    except ImportError:  # pragma: no cover
        return None
    fwd = RotaryEmbedding.forward
    return fwd if hasattr(fwd, "cache_clear") else None


# --------------------------------------------------------------------------------------------------
# layouts


def _tp_size(world_size: int) -> int:
    mod = sys.modules.get("megatron.core.parallel_state")
    if mod is not None and mod.model_parallel_is_initialized():
        return mod.get_tensor_model_parallel_world_size()
    return world_size


@dataclass(frozen=True)
class TPBlocks:
    """megatron's split of a tensor-parallel tensor when the tensor-parallel group is not all ranks:
    the global tensor in ``stride * tp`` equal blocks along ``dim``; global rank r (tensor-parallel
    rank ``r % tp``: megatron's default order "tp-cp-ep-dp-pp" makes TP the fastest-varying) holds blocks
    ``t, t + tp, ...`` concatenated (``_initialize_affine_weight_cpu``)."""

    dim: int
    stride: int
    tp: int

    def __call__(self, g: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        blocks = torch.chunk(g, self.stride * self.tp, dim=self.dim)
        t = rank % self.tp
        return torch.cat([blocks[t + k * self.tp] for k in range(self.stride)], dim=self.dim)


def megatron_layout(dim: int, stride: int, tp: int, world_size: int):
    """The placement of a megatron tensor-parallel tensor (``partition_dim``, ``partition_stride``)."""
    from gg_notebook.adapters.layouts import strided_layout

    if tp == world_size:
        return Shard(dim) if stride == 1 else strided_layout(dim, stride)
    return Layout(TPBlocks(dim, stride, tp), name=f"megatron(dim={dim}, stride={stride}, tp={tp})")


class _MegatronAdapter:
    name = "megatron"
    package = "megatron.core"
    install = _INSTALL

    def owns(self, model: torch.nn.Module) -> bool:
        return any(type(m).__module__.startswith("megatron.") for m in model.modules())

    def shims(self):
        return shims()

    def placement(self, model, name: str, local: torch.Tensor, global_shape: tuple, rank: int, world_size: int):
        if not getattr(local, "tensor_model_parallel", False):
            return None
        dim = getattr(local, "partition_dim", -1)
        stride = getattr(local, "partition_stride", 1)
        if dim is None or dim < 0:
            return None
        tp = _tp_size(world_size)
        if tp == 1:
            return Replicate() if tuple(local.shape) == tuple(global_shape) else None
        return megatron_layout(dim, stride, tp, world_size)

    def grad_placement(self, model, name: str, local: torch.Tensor, placement):
        if getattr(local, "sequence_parallel", False):
            return Partial()
        return None


ADAPTER = _MegatronAdapter()
