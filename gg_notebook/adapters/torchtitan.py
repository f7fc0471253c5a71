"""torchtitan (0.3.x) models for `gg.Problem.from_modules`: shims, placements, a TP builder, a loss.

A torchtitan user verifies a model with torchtitan's own tensor parallelism like this::

    import gg_notebook as gg
    from gg_notebook.adapters import torchtitan as tt
    cfg = tt.llama3_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128)
    tokens, labels = torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))
    problem = gg.Problem.from_modules(
        sequential=lambda: tt.build(cfg, tp=1),
        distributed=lambda: tt.build(cfg, tp=2, sp=True),
        inputs=(tokens, labels), placements=(gg.Replicate(), gg.Replicate()), world_size=2,
        forward=tt.loss, grads=True)
    gg.verify(problem).status          # "proved"

`build` runs exactly the tensor-parallel step of torchtitan's ``parallelize_llama``
(``model.parallelize(parallel_dims)``, which reads every submodule's ``sharding_config``) and its
weight initialisation; `loss` is the trainer's step: the SPMD context, torchtitan's input
annotation, the model, and torchtitan's ``CrossEntropyLoss`` (loss-parallel on vocab-sharded logits
when TP > 1). FSDP is not applied (its runtime hooks read data pointers, which tracing cannot).

Placements: with the default SPMD backend ``spmd_types`` the parameters are plain local tensors;
their layout is declared on the owning module, ``module._sharding_config.state_shardings[name]``
(``{tp: S(0)}``, ``{tp: S(1)}``, ``{tp: I}``, ``{tp: R}``), which `ADAPTER.placement` reads. With
``partial_dtensor`` / ``full_dtensor`` they are DTensors, read by the core from their placements.
Gradients (`ADAPTER.grad_placement`): spmd_types' rule, the gradient of an ``R`` (replicate) value
is ``P`` (partial) and of ``I`` (invariant) / ``S(d)`` the same type: sequence-parallel norm weights
(``R``) keep partial gradients on the ranks, reduced later by the trainer.

Shims (`ADAPTER.shims`, all restored on exit): ``torchtitan.trainer`` stubbed for the one
``isinstance`` check that imports it (it pulls in datasets / tensorboard / wandb); without triton,
the expert-parallel GPU kernel module stubbed (imported unconditionally by the decoder, never run
here); torchtitan's ``device_type`` set to "cpu"; ``FlexAttention``'s compiled kernel replaced by
the eager one; the SPMD backend and the spmd_types mesh stack fresh. spmd_types' local conversion
operators (``spmd_types::replicate_to_varying`` ...) get their plain-PyTorch definitions.

Not covered: FlexAttention (the default attention of torchtitan's llama3 flavors) needs block masks
built by a compiled function and has no CPU backward, so `build` swaps in torchtitan's SDPA
attention by default (``attention=None`` keeps flex, which `loss` cannot feed masks to yet); the
``full_dtensor`` backend puts parameters on a sub-mesh of a flattened world mesh, which
`from_modules` does not read yet; FSDP / data parallelism.

torchtitan is imported only when this module's functions are used.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager
from typing import Any, Iterator

import torch

PACKAGE = "torchtitan"
INSTALL = "pip install -c constraints.txt '.[titan]'"


def _require() -> None:
    if importlib.util.find_spec("torchtitan") is None or importlib.util.find_spec("spmd_types") is None:
        missing = "torchtitan" if importlib.util.find_spec("torchtitan") is None else "spmd_types"
        raise ImportError(
            f"gg_notebook's torchtitan adapter needs the {missing} package, which is not installed: "
            f"install it with {INSTALL} (torchtitan 0.3.0 with spmd_types 0.2.3).")


# --------------------------------------------------------------------------------------------------
# Shims


class _Unavailable(types.ModuleType):
    """Stands in for a torchtitan module that cannot be imported here (GPU-only kernels): importing
    names from it works, calling any of them raises."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                f"{self.__name__}.{name} needs triton (GPU kernels), which gg_notebook's torchtitan adapter "
                "replaced by a stub because triton is not installed.")

        return unavailable


def _trainer_stub() -> types.ModuleType:
    """``torchtitan.trainer`` imports the whole training stack (datasets, tensorboard, wandb...);
    ``Decoder.Config.update_from_config`` imports it only for ``isinstance(config, Trainer.Config)``,
    which the adapter's job config never is."""
    mod = types.ModuleType("torchtitan.trainer")

    class Trainer:  # noqa: D401 - a stub
        class Config:
            pass

    mod.Trainer = Trainer
    mod.__gg_stub__ = True
    return mod


_KERNELS = "torchtitan.distributed.minimal_async_ep.kernels"


@contextmanager
def _import_shims() -> Iterator[None]:
    """Modules torchtitan imports but a CPU verification never runs: the trainer (for an isinstance
    check) and, when triton is missing, the expert-parallel GPU kernels."""
    saved = {k: sys.modules.get(k) for k in ("torchtitan.trainer", _KERNELS)}
    try:
        real_trainer = saved["torchtitan.trainer"]
        if real_trainer is None or getattr(real_trainer, "__gg_stub__", False):
            sys.modules["torchtitan.trainer"] = _trainer_stub()
        if saved[_KERNELS] is None and importlib.util.find_spec("triton") is None:
            sys.modules[_KERNELS] = _Unavailable(_KERNELS)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _replicate_to_varying(x, world_size, split_dim, rank, stack):
    if stack:
        return x.select(split_dim, rank).clone()
    return torch.chunk(x, world_size, dim=split_dim)[rank].clone()


def _varying_to_partial(x, world_size, split_dim, rank, stack):
    piece = x.unsqueeze(split_dim) if stack else x
    zeros = torch.zeros_like(piece)
    return torch.cat([zeros] * rank + [piece] + [zeros] * (world_size - rank - 1), dim=split_dim)


def _replicate_to_partial(x, rank):
    return x.clone() if rank == 0 else torch.zeros_like(x)


def _register_definitions() -> None:
    """spmd_types' local type conversions are custom operators (R -> V takes this rank's chunk,
    V -> P and R -> P pad with zeros): their definitions in plain PyTorch, in gg_notebook's table of
    operator definitions (`gg_notebook.ir.decompose.BUILTIN`), so that a rank calling them is seen
    through (spmd_types 0.2.x; each definition is exactly the operator's forward)."""
    from gg_notebook.ir.decompose import BUILTIN

    ops = getattr(torch.ops, "spmd_types", None)
    for name, fn in (("replicate_to_varying", _replicate_to_varying), ("varying_to_partial", _varying_to_partial),
                     ("replicate_to_partial", _replicate_to_partial)):
        try:
            op = getattr(getattr(ops, name), "default")
        except (AttributeError, RuntimeError):
            continue
        BUILTIN.setdefault(op, fn)


def _titan() -> types.SimpleNamespace:
    """The torchtitan modules the adapter uses (imported under the import shims)."""
    _require()
    with _import_shims():
        import torchtitan.distributed.parallel_dims as parallel_dims
        import torchtitan.distributed.spmd_types as titan_spmd
        import torchtitan.distributed.utils as dist_utils
        import torchtitan.tools.utils as tools_utils
        from torchtitan.components.loss import CrossEntropyLoss
        from torchtitan.config import ParallelismConfig
        from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
    ns = types.SimpleNamespace(**{k: v for k, v in locals().items()})
    _register_definitions()
    return ns


@contextmanager
def _shims() -> Iterator[None]:
    t = _titan()
    saved_device = [(m, m.device_type) for m in (t.parallel_dims, t.tools_utils, t.dist_utils)]
    saved_flex = t.FlexAttention.__dict__.get("_compiled_flex_attn")
    saved_backend = t.dist_utils._spmd_backend
    tls = t.titan_spmd._MESH_TLS
    saved_tls = dict(vars(tls))
    with _import_shims():
        try:
            for m, _ in saved_device:  # torchtitan falls back to "cuda" without an accelerator
                m.device_type = "cpu"
            from torch.nn.attention.flex_attention import flex_attention

            # the class holds torch.compile(flex_attention), which make_fx refuses to trace
            t.FlexAttention._compiled_flex_attn = staticmethod(flex_attention)
            t.dist_utils._spmd_backend = "spmd_types"  # fresh global state: torchtitan's default
            vars(tls).clear()
            yield
        finally:
            for m, v in saved_device:
                m.device_type = v
            if saved_flex is not None:
                t.FlexAttention._compiled_flex_attn = saved_flex
            t.dist_utils._spmd_backend = saved_backend
            vars(tls).clear()
            vars(tls).update(saved_tls)


@contextmanager
def _rope_tables_once() -> Iterator[None]:
    """Every attention layer of a torchtitan decoder holds its own RoPE table, which its
    ``_precompute_cache`` computes from the layer's RoPE config alone, on the default device: within
    this context each distinct (RoPE class, config, device) table is computed once and every layer
    gets its own copy of it (the same values; a 126-layer model computed 252 tables per build, about
    half of a meta build's time). A config that is not a dataclass is computed as before."""
    import dataclasses

    with _import_shims():
        from torchtitan.models.common import rope

    classes, todo = [], [rope.RoPE]
    while todo:
        c = todo.pop()
        todo.extend(c.__subclasses__())
        if "_precompute_cache" in c.__dict__:
            classes.append(c)
    tables: dict = {}

    def once(original):
        def _precompute_cache(self):
            cfg = getattr(self, "config", None)
            if not dataclasses.is_dataclass(cfg):
                return original(self)
            key = (type(self), original, repr(dataclasses.astuple(cfg)), str(torch.get_default_device()))
            hit = tables.get(key)
            if hit is None:
                hit = tables[key] = original(self)
            return hit.clone()
        return _precompute_cache

    saved = [(c, c.__dict__["_precompute_cache"]) for c in classes]
    try:
        for c, f in saved:
            c._precompute_cache = once(f)
        yield
    finally:
        for c, f in saved:
            c._precompute_cache = f


# --------------------------------------------------------------------------------------------------
# Building a model the way torchtitan's trainer does (TP step of parallelize_llama)


class _JobConfig:
    """What ``update_from_config`` reads from the trainer's config: the parallelism section."""

    def __init__(self, parallelism: Any) -> None:
        self.parallelism = parallelism


class _TitanState:
    def __init__(self, parallel_dims: Any, backend: str, vocab_size: int, tp: int, sp: bool) -> None:
        self.parallel_dims, self.backend, self.vocab_size, self.tp, self.sp = parallel_dims, backend, vocab_size, tp, sp

    def context(self):
        t = _titan()
        return t.dist_utils.get_spmd_context(parallel_dims=self.parallel_dims)()


def llama3_config(*, dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = 2,
                  vocab_size: int = 128, hidden_dim: int | None = None, max_seq_len: int = 64,
                  fuse_qkv: bool = True, attn_backend: str = "flex") -> Any:
    """A small ``Llama3Model.Config`` built the way torchtitan's own flavors (``llama3_configs``) are,
    with torchtitan's initialisers; sizes are the caller's."""
    _require()
    with _import_shims():
        from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
        from torchtitan.models.llama3 import (
            _EMBEDDING_INIT,
            _NORM_INIT,
            Llama3Model,
            _build_llama3_layers,
            _output_linear_init,
        )
    hidden_dim = hidden_dim or 2 * dim
    return Llama3Model.Config(
        dim=dim, vocab_size=vocab_size,
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=_output_linear_init(dim)),
        layers=_build_llama3_layers(
            fuse_qkv=fuse_qkv, n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
            hidden_dim=hidden_dim,
            rope=ComplexRoPE.Config(dim=dim // n_heads, max_seq_len=max_seq_len, theta=500000, scaling="llama"),
            attn_backend=attn_backend))


def build(model_config: Any, *, tp: int | None = None, sp: bool = True, backend: str = "spmd_types",
          attention: str | None = "sdpa", seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """Build ``model_config`` (a torchtitan decoder config) and apply torchtitan's tensor parallelism
    of degree ``tp`` (default: the process group's size) with sequence parallelism ``sp``, as
    ``parallelize_llama`` does: ``update_from_config`` fills every submodule's ``sharding_config``,
    the model is built on meta, ``model.parallelize(parallel_dims)`` applies the TP/SP plan, then
    ``init_weights`` runs in the SPMD context. ``attention="sdpa"`` swaps each layer's inner attention
    for torchtitan's ``ScaledDotProductAttention`` (causal; FlexAttention has no CPU backward),
    ``None`` keeps the configured one. No FSDP (data parallel degree 1).

    ``device="meta"`` keeps the parameters on the meta device (shapes only: nothing is allocated for
    weights, for frontier-sized shapes; the proof does not read parameter values) while the buffers
    (the RoPE table) are still computed for real on the CPU by torchtitan's own initialiser, so that
    each rank's table is still compared with the sequential model's."""
    import torch.distributed as dist

    if device not in ("cpu", "meta"):
        raise ValueError(f"build(device={device!r}): use 'cpu' (weights allocated and initialised) or 'meta' "
                         "(shapes only).")
    t = _titan()
    with _shims(), _rope_tables_once():
        world = dist.get_world_size() if dist.is_initialized() else 1
        tp = world if tp is None else tp
        if tp != world:
            raise ValueError(
                f"build(tp={tp}) runs in a process group of size {world}: torchtitan's tensor-parallel degree "
                f"must equal the world size here (no data parallelism); use tp={world}.")
        if not dist.is_initialized():
            raise RuntimeError("build() needs a process group (gg.Problem.from_modules creates one per program).")
        cfg = copy.deepcopy(model_config)
        if attention == "sdpa":
            for layer in getattr(cfg, "layers", []):
                att = getattr(layer, "attention", None)
                if att is not None and hasattr(att, "inner_attention"):
                    att.inner_attention = t.ScaledDotProductAttention.Config()
        elif attention is not None:
            raise ValueError(f"attention={attention!r}: use 'sdpa' or None (keep the configured attention).")
        par = t.ParallelismConfig(tensor_parallel_degree=tp, enable_sequence_parallel=bool(sp and tp > 1),
                                  spmd_backend=backend, data_parallel_shard_degree=1)
        pdims = t.parallel_dims.ParallelDims.from_config(par, world)
        pdims.build_mesh()
        t.dist_utils.set_spmd_backend(backend)
        cfg.update_from_config(config=_JobConfig(par))
        with torch.device("meta"):
            model = cfg.build()
        if backend != "partial_dtensor":
            from torchtitan.distributed.full_dtensor import validate_config

            validate_config(pdims, model)
        if pdims.tp_enabled:
            model.parallelize(pdims)
        if device == "cpu":
            model.to_empty(device="cpu")
        state = _TitanState(pdims, backend, int(cfg.vocab_size), tp, bool(sp and tp > 1))
        torch.manual_seed(seed)
        with torch.no_grad(), state.context():
            # on meta, torchtitan's parameter initialisers are no-ops and buffers are computed on the CPU
            model.init_weights(buffer_device=None if device == "cpu" else torch.device("cpu"))
    model._gg_titan = state
    return model


def _state_or_none(model: torch.nn.Module) -> "_TitanState | None":
    for m in model.modules():
        st = getattr(m, "_gg_titan", None)
        if st is not None:
            return st
    return None


def _state(model: torch.nn.Module) -> _TitanState:
    st = _state_or_none(model)
    if st is not None:
        return st
    raise ValueError("this model was not built by gg_notebook.adapters.torchtitan.build(...)")


def _model_inputs(t, st, tokens, labels):
    """``(tokens, labels, kwargs)`` annotated as torchtitan's trainer does for the model's backend."""
    kw: dict = {}
    if st.backend == "spmd_types":
        return t.titan_spmd.annotate_input_spmd_types(st.parallel_dims, tokens, labels, kw)
    if st.backend == "full_dtensor":
        from torchtitan.distributed.full_dtensor import parallelize_inputs

        return parallelize_inputs(st.parallel_dims, tokens, labels, kw)
    return tokens, labels, kw


def loss(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torchtitan's training-step loss: in the SPMD context, inputs annotated as the trainer does
    (``annotate_input_spmd_types`` / ``full_dtensor.parallelize_inputs``), ``model(tokens)``, then
    torchtitan's ``CrossEntropyLoss`` (sum over tokens; loss-parallel on vocab-sharded logits)."""
    t = _titan()
    st = _state(model)
    with _shims():
        t.dist_utils.set_spmd_backend(st.backend)
        with st.context():
            tokens, labels, kw = _model_inputs(t, st, tokens, labels)
            pred = model(tokens, **kw)
            out, _ = t.CrossEntropyLoss(t.CrossEntropyLoss.Config(global_vocab_size=st.vocab_size))(pred, labels)
    return out


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model(tokens)`` in torchtitan's SPMD context (the logits, vocab-sharded on TP ranks)."""
    t = _titan()
    st = _state(model)
    with _shims():
        t.dist_utils.set_spmd_backend(st.backend)
        with st.context():
            tokens, _, kw = _model_inputs(t, st, tokens, tokens)
            return model(tokens, **kw)


# --------------------------------------------------------------------------------------------------
# Placements from spmd_types shardings


def _tp_type(model: torch.nn.Module, name: str):
    """The spmd_types type of parameter/buffer ``name`` on the TP mesh axis, from its module's
    ``_sharding_config.state_shardings`` (None: not declared)."""
    mod_name, _, leaf = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    sc = getattr(mod, "_sharding_config", None)
    shardings = getattr(sc, "state_shardings", None) or {}
    layout = shardings.get(leaf)
    if layout is None:
        return None
    axis_types = getattr(layout, "axis_types", None) or {}
    found = None
    for axis, typ in axis_types.items():
        if str(getattr(axis, "value", axis)) == "tp":
            found = typ
    return found


def _replicated_off_tp(model: torch.nn.Module, name: str) -> bool:
    """Every mesh axis but tp holds the tensor whole (R or I): the tp type alone is its layout."""
    import spmd_types as spmd

    mod_name, _, leaf = name.rpartition(".")
    sc = getattr(model.get_submodule(mod_name) if mod_name else model, "_sharding_config", None)
    layout = (getattr(sc, "state_shardings", None) or {}).get(leaf)
    for axis, typ in (getattr(layout, "axis_types", None) or {}).items():
        if str(getattr(axis, "value", axis)) != "tp" and not (typ is spmd.R or typ is spmd.I):
            return False
    return True


def _placement_of_type(typ, what: str):
    from torch.distributed.tensor import Partial, Replicate, Shard

    s = repr(typ)
    import spmd_types as spmd

    if typ is spmd.R or typ is spmd.I or s in ("R", "I"):
        return Replicate()
    if typ is spmd.P or s == "P":
        return Partial()
    dim = getattr(typ, "dim", None)
    if isinstance(dim, int) and s.startswith("S("):
        return Shard(dim)
    raise ValueError(f"{what}: spmd_types type {s} on the tp axis is not a placement gg_notebook knows")


class _Adapter:
    name = "torchtitan"
    package = PACKAGE
    install = INSTALL

    def owns(self, model: torch.nn.Module) -> bool:
        return any(type(m).__module__.startswith("torchtitan.") for m in model.modules())

    @contextmanager
    def shims(self) -> Iterator[None]:
        with _shims():
            yield

    def placement(self, model, name, local, global_shape, rank, world_size):
        from torch.distributed.tensor import DTensor

        st = _state_or_none(model)
        if isinstance(local, DTensor) or (st is not None and st.backend != "spmd_types"):
            return None  # the core reads DTensor placements
        typ = _tp_type(model, name)
        if typ is None or not _replicated_off_tp(model, name):
            return None  # sharded along another mesh axis (dp, cp): not read here (the core says so)
        return _placement_of_type(typ, f"torchtitan parameter {name}")

    def grad_placement(self, model, name, local, placement):
        st = _state_or_none(model)
        if st is not None and st.backend != "spmd_types":
            return None  # DTensor parameters: from_local's backward makes a Replicate gradient full
        typ = _tp_type(model, name)
        if typ is None:
            return None
        import spmd_types as spmd
        from torch.distributed.tensor import Partial

        if typ is spmd.R or repr(typ) == "R":
            return Partial()  # spmd_types: the gradient of a replicate (R) value is partial (P)
        return None


ADAPTER = _Adapter()

__all__ = ["ADAPTER", "build", "loss", "logits", "llama3_config"]
