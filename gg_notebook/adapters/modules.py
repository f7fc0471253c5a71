"""Models as a `Problem`: `from_modules` (``gg.Problem.from_modules``).

The user gives two builders, the single-device model and one rank's shard of it, the global batch
and how it is placed, and (optionally) what to run: ``forward(model, *batch)``, its gradients with
respect to every trainable parameter (``grads=True``). Everything else is read from the models:

* Each program builds its model for real, outside the trace, in its own process (the sequential one
  under a process group of one rank, rank r under a process group of ``world_size`` ranks), so a
  framework's global state (parallel state, memory buffers, RNG trackers, caches) starts afresh for
  every rank, as in a real job. Framework adapters (`gg_notebook.adapters.frameworks`) supply the
  patches a framework needs on a CPU without GPUs.
* Parameters, buffers and plain tensor attributes of submodules (a rotary ``inv_freq``, a complex
  ``freqs_cis``) are inputs of the problem, matched by qualified name between the two models. Their
  global values are the single-device model's; each rank's local values derive from them by the
  parameter's placement, so the two models' initializations need not agree.
* A rank parameter's placement is read from the model's own metadata: DTensor placements (HF
  ``tp_plan``, ``parallelize_module``, torchtitan), then the framework adapters (megatron's
  ``partition_dim`` / ``partition_stride``, torchtitan's sharding configs), else ``Replicate()`` when
  the local shape is the global shape. ``param_placements={name: placement}`` overrides any of them.
  Every rank's reading must agree with rank 0's and give the shape the rank's model has, or the
  error names the parameter, the rank and both shapes.
* With ``grads=True`` the outputs are ``forward``'s outputs followed by the gradient of its (first,
  scalar) output with respect to each trainable parameter, in name order; the ranks' gradients are
  expected in the parameter's placement, or where the adapter says otherwise (the gradient of a
  sequence-parallel norm weight is a partial sum on the ranks).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from gg_notebook.capture.errors import CaptureError, program_name
from gg_notebook.problem import InputPlacement, Layout, Partial, Problem, ProblemError, Replicate, Shard

KINDS = ("parameter", "buffer", "attribute")


class ModelError(ProblemError):
    """The two models do not fit together (names, shapes, placements); the message says which
    parameter, which rank and what to change."""


# ------------------------------------------------------------------------------------------ state


@dataclass(frozen=True)
class StateInfo:
    """One named tensor of a model, as one program sees it."""

    name: str
    kind: str  # "parameter" | "buffer" | "attribute"
    shape: tuple
    dtype: torch.dtype
    trainable: bool
    placement: Any = None  # ranks: Replicate() / Shard(d) / Partial() / Layout
    grad_placement: Any = None
    source: str = ""  # where the placement was read ("DTensor", "megatron", "shape", "param_placements")


def named_state(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """``{qualified name: (kind, tensor)}``: parameters, buffers, and tensor attributes of submodules
    (tensors held as plain attributes, e.g. a rotary ``inv_freq`` or ``freqs_cis``). Tied tensors
    appear once, under their first name."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        out[name] = ("parameter", p)
        seen.add(id(p))
    for name, b in model.named_buffers():
        if id(b) not in seen:
            out[name] = ("buffer", b)
            seen.add(id(b))
    for mod_name, m in model.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and id(v) not in seen:
                out[f"{mod_name}.{k}" if mod_name else k] = ("attribute", v)
                seen.add(id(v))
    return out


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _trainable(kind: str, t: torch.Tensor) -> bool:
    return kind == "parameter" and t.requires_grad and (t.dtype.is_floating_point or t.dtype.is_complex)


# ------------------------------------------------------------------------------------- placements


def dtensor_placement(t, world_size: int) -> InputPlacement:
    """A DTensor's placement as a problem placement: ``Shard(d)``/``Replicate()`` on a 1-D mesh of
    all ranks in order (evenly divisible), else a `Layout` over the mesh grid."""
    from torch.distributed.tensor import Partial as DPartial, Replicate as DReplicate, Shard as DShard

    from gg_notebook.adapters.layouts import mesh_layout

    mesh = t.device_mesh
    ranks = mesh.mesh.tolist()
    placements = tuple(t.placements)
    strided = _strided_shard(t, placements, ranks, world_size)
    if strided is not None:
        return strided
    for p in placements:
        if isinstance(p, DPartial):
            raise ModelError(
                f"a DTensor parameter is Partial on its mesh ({placements}): parameters are Replicate or Shard; "
                "pass param_placements={name: ...} if this is intended.")
        if not isinstance(p, (DShard, DReplicate)):
            raise ModelError(
                f"the DTensor placement {p!r} is not supported yet (Shard and Replicate are); pass "
                "param_placements={name: gg.Layout(fn)} with the layout written out.")
    if mesh.ndim == 1 and ranks == list(range(world_size)):
        p = placements[0]
        if isinstance(p, DReplicate):
            return Replicate()
        d = p.dim % t.dim()
        if t.shape[d] % world_size == 0:
            return Shard(d)
    # A sub-mesh (the "tp" dimension of a dp x tp mesh) holds only this rank's group; the layout of
    # every rank needs the whole mesh, replicated along the dimensions the tensor is not placed on.
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    if root is not mesh:
        names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
        if not names or not root_names or any(n not in root_names for n in names):
            raise ModelError(
                f"a DTensor parameter lives on a sub-mesh {names} of a mesh {root_names} whose dimensions cannot be "
                "matched by name (flattened meshes are not supported yet): pass param_placements={name: gg.Layout(fn)}.")
        full = [DReplicate()] * root.ndim
        for i, n in enumerate(names):
            full[root_names.index(n)] = placements[i]
        return mesh_layout(root.mesh.tolist(), tuple(full))
    return mesh_layout(ranks, placements)


def _strided_shard(t, placements, ranks, world_size: int):
    """DTensor's ``_StridedShard(d, split_factor=k)`` on a 1-D mesh of all ranks in order (packed
    weights, e.g. transformers' ``packed_colwise`` fused gate/up: ``k`` blocks along d, each chunked
    over the ranks): rank r holds the r-th chunk of every block, i.e. `strided_layout(d, k)`."""
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover
        return None
    if len(placements) != 1 or not isinstance(placements[0], _StridedShard) or ranks != list(range(world_size)):
        return None
    from gg_notebook.adapters.layouts import strided_layout

    p = placements[0]
    d, k = p.dim % t.dim(), int(p.split_factor)
    if t.shape[d] % (k * world_size):
        raise ModelError(f"a DTensor placed {p!r} has size {t.shape[d]} along dim {d}, not divisible into "
                         f"{k} x {world_size} blocks: pass param_placements={{name: gg.Layout(fn)}}.")
    return strided_layout(d, k)


def _placement_str(p) -> str:
    if isinstance(p, Layout):
        return repr(p)
    return f"{type(p).__name__}({getattr(p, 'dim', '')})"


def _expected_local_shape(placement, global_shape: tuple, rank: int, world_size: int) -> tuple:
    from gg_notebook.problem import local_input

    g = torch.empty(global_shape, device="meta")
    return tuple(local_input(g, placement, rank, world_size).shape)


# ----------------------------------------------------------------------------------------- spec


@dataclass
class ModelSpec:
    """What `from_modules` was given (shared by the sequential and the rank programs)."""

    sequential: Callable[[], nn.Module]
    distributed: Callable[[], nn.Module]
    forward: Callable[..., Any] | None
    grads: bool
    world_size: int
    batch_names: tuple[str, ...]
    param_placements: Mapping[str, InputPlacement] = field(default_factory=dict)
    adapters: tuple = ()


def _default_forward(model: nn.Module, *batch):
    return model(*batch)


def _first_user_frame(tb) -> str | None:
    from gg_notebook.capture.source import format_source, user_frames_of_traceback

    frames = user_frames_of_traceback(tb)
    return format_source(frames[-1]) if frames else None


def _build(spec: ModelSpec, rank: int | None) -> nn.Module:
    builder = spec.sequential if rank is None else spec.distributed
    what = "sequential" if rank is None else "distributed"
    try:
        model = builder()
    except Exception as e:
        src = _first_user_frame(e.__traceback__)
        raise CaptureError(
            f"{program_name(rank)}: building the model ({what}()) raised {type(e).__name__}"
            f"{f' at {src}' if src else ''}: {e}", rank=rank, source=src) from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"{what}() returned a {type(model).__name__}; it must build and return a torch.nn.Module.")
    return model


@contextlib.contextmanager
def _program_context(spec: ModelSpec, rank: int | None) -> Iterator[None]:
    """The process group (one rank for the sequential model) and the frameworks' patches."""
    import torch.distributed as dist

    from gg_notebook.adapters.frameworks import shims

    with contextlib.ExitStack() as stack:
        if rank is None and not dist.is_initialized():
            from gg_notebook.capture.tracing import fake_process_group

            stack.enter_context(fake_process_group(0, 1))
        stack.enter_context(shims(spec.adapters))
        yield


def read_state(spec: ModelSpec, model: nn.Module, rank: int | None,
               global_shapes: Mapping[str, tuple] | None = None) -> dict[str, StateInfo]:
    """The model's named tensors; for a rank (``global_shapes`` given) with their placements."""
    from gg_notebook.adapters.frameworks import read_grad_placement, read_placement

    W = spec.world_size
    out = {}
    for name, (kind, t) in named_state(model).items():
        info = dict(name=name, kind=kind, shape=tuple(t.shape), dtype=t.dtype, trainable=_trainable(kind, t))
        if rank is not None:
            loc = _local(t)
            gshape = (global_shapes or {}).get(name)
            if name in spec.param_placements:
                p, src = spec.param_placements[name], "param_placements"
            elif _is_dtensor(t):
                p, src = dtensor_placement(t, W), "DTensor"
            else:
                p, src = read_placement(spec.adapters, model, name, loc, gshape, rank, W)
                if p is None and gshape is not None and tuple(loc.shape) == tuple(gshape):
                    p, src = Replicate(), "shape"
            if p is None and gshape is None and global_shapes is not None:
                hint = (" (DistributedDataParallel keeps the model as .module: build the sequential model wrapped "
                        "alike, or pass the inner module)" if name.startswith("module.") else "")
                raise ModelError(f"rank {rank}'s model has a {kind} {name} that the sequential model lacks{hint}: the "
                                 f"two builders must build models with the same tensor names.")
            if p is None:
                raise ModelError(
                    f"rank {rank}: {kind} {name} has local shape {tuple(loc.shape)} but the sequential model's is "
                    f"{gshape}, and nothing in the model says how it is split (no DTensor placement, no framework "
                    f"attributes): pass param_placements={{{name!r}: gg.Shard(d) or gg.Layout(fn)}}.")
            g = read_grad_placement(spec.adapters, model, name, loc, p) if info["trainable"] else None
            info.update(shape=tuple(loc.shape), placement=p, grad_placement=g if g is not None else p, source=src)
        out[name] = StateInfo(**info)
    return out


# ----------------------------------------------------------------------------------- discovery


def _refuse_unsupported_wrappers(spec: ModelSpec, model: nn.Module, rank: int | None) -> None:
    """PyTorch's data-parallel wrappers whose communication tracing cannot see: a clear error instead
    of a wrong verdict."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    from torch.nn.parallel import DistributedDataParallel

    if FSDPModule and any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ModelError(
            f"{program_name(rank)}: the model is sharded with FSDP2 (fully_shard), which gg_notebook cannot trace: its "
            f"all-gather is copied out by a custom operator that writes into its output buffers "
            f"(fsdp::split_with_sizes_copy), which make_fx's functionalization refuses. Verify the training step "
            f"written with plain collectives "
            f"(dist.all_gather_into_tensor per layer, dist.reduce_scatter_tensor of the gradients: see "
            f"gg_notebook/examples/data_parallel.py, fsdp_step).")
    if spec.grads and isinstance(model, DistributedDataParallel):
        raise ModelError(
            f"{program_name(rank)}: DistributedDataParallel averages the gradients in its C++ reducer, from hooks "
            f"that fire during loss.backward() and are not traced (from_modules takes the gradients with "
            f"torch.autograd.grad): the ranks' gradients would be their local ones. Verify the forward alone "
            f"(grads=False), or the step written with dist.all_reduce of each gradient (see "
            f"gg_notebook/examples/data_parallel.py, ddp_step).")


@dataclass
class _Discovered:
    state: dict[str, StateInfo]
    values: dict[str, torch.Tensor]


def _discover(spec: ModelSpec, item) -> _Discovered:
    rank, global_shapes = item
    W = 1 if rank is None else spec.world_size
    from gg_notebook.capture.tracing import fake_process_group

    with contextlib.ExitStack() as stack:
        if rank is not None:
            stack.enter_context(fake_process_group(rank, W))
        stack.enter_context(_program_context(spec, rank))
        model = _build(spec, rank)
        _refuse_unsupported_wrappers(spec, model, rank)
        state = read_state(spec, model, rank, global_shapes)
        values = {}
        if rank is None:
            for name, (kind, t) in named_state(model).items():
                v = _local(t).detach()
                # a meta tensor stays meta (shape only): a model built on the meta device may be far too
                # large to allocate, and the proof does not read values
                values[name] = v.clone() if v.device.type != "meta" else torch.empty(v.shape, dtype=v.dtype, device="meta")
    return _Discovered(state, values)


def _run_discovery(spec: ModelSpec, item) -> _Discovered:
    from gg_notebook.capture.forked import fork_available, run_forked

    if fork_available():
        return run_forked(functools.partial(_discover, spec), [item], 1)[0]
    return _discover(spec, item)  # pragma: no cover - no fork: framework state leaks into this process


# ------------------------------------------------------------------------------------- programs


class ModuleProgram:
    """One program of a `from_modules` problem (the sequential one, or every rank's): builds its
    model in the capturing process (`gg_session`) and runs ``forward`` on it with the problem's
    tensors swapped in."""

    def __init__(self, spec: ModelSpec, names: Sequence[str], declared: Mapping[str, StateInfo] | None,
                 global_shapes: Mapping[str, tuple], sequential: bool) -> None:
        self.spec = spec
        self.names = tuple(names)  # state tensors, in input order
        self.declared = dict(declared or {})
        self.global_shapes = dict(global_shapes)
        self.sequential = sequential
        self.computed: dict[str, torch.Tensor] = {}  # buffers and tensor attributes: sequential values
        self.__name__ = "sequential_model" if sequential else "distributed_model"

    def __call__(self, *tensors):
        import torch.distributed as dist

        rank = None if self.sequential else dist.get_rank()
        with self.gg_session(rank, self.spec.world_size) as fn:
            return fn(*tensors)

    @contextlib.contextmanager
    def gg_session(self, rank: int | None, world_size: int) -> Iterator[Callable[..., Any]]:
        """Enter the program's process group and framework patches, build the model, and yield the
        function to trace: ``fn(*state tensors, *batch) -> outputs``."""
        spec = self.spec
        rank = None if self.sequential else rank
        with _program_context(spec, rank):
            model = _build(spec, rank)
            state = read_state(spec, model, rank, None if rank is None else self.global_shapes)
            self._check(state, rank)
            if rank is not None:
                self._check_computed_state(model, state, rank)
            yield functools.partial(_run, spec, model, self.names, state)

    def _check_computed_state(self, model: nn.Module, state: Mapping[str, StateInfo], rank: int) -> None:
        """Buffers and tensor attributes are computed by the rank's own code (a rotary table, a
        mask, a vocabulary offset), not loaded like weights: the rank's values must be the ones its
        placement derives from the sequential model's, or what is proved is not what the rank runs."""
        from gg_notebook.problem import local_input

        current = named_state(model)
        for name, want_global in self.computed.items():
            have = _local(current[name][1]).detach()
            if have.device.type == "meta":
                continue  # no values to compare (a model built on the meta device)
            want = local_input(want_global, state[name].placement, rank, self.spec.world_size)
            if have.shape != want.shape or have.dtype != want.dtype or not torch.equal(have, want):
                diff = ""
                if have.shape == want.shape and have.dtype == want.dtype and have.dtype.is_floating_point:
                    diff = f" (largest difference {float((have.double() - want.double()).abs().max()):.3g})"
                raise ModelError(
                    f"rank {rank}: {state[name].kind} {name} holds values{diff} that differ from the sequential model's "
                    f"(placed as {_placement_str(state[name].placement)}): a buffer or tensor attribute is computed "
                    "by the model's own code, so the ranks would run with other values than the ones verified. Make "
                    "both builders compute it alike, or make it a parameter (loaded like a weight).")

    def _check(self, state: Mapping[str, StateInfo], rank: int | None) -> None:
        missing = [n for n in self.names if n not in state]
        extra = [n for n in state if n not in self.names]
        who = program_name(rank)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            if extra:
                parts.append(f"has {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} that the sequential model lacks")
            raise ModelError(
                f"{who}'s model {' and '.join(parts)}: the two builders must build the same model (same parameter, "
                "buffer and tensor-attribute names), sharded or not.")
        if rank is None:
            return
        for name in self.names:
            got, want = state[name], self.declared.get(name)
            if want is not None and (got.placement != want.placement or got.grad_placement != want.grad_placement):
                raise ModelError(
                    f"rank {rank}: {name} is placed as {_placement_str(got.placement)} but on rank 0 as "
                    f"{_placement_str(want.placement)}: every rank must build the same sharded model.")
            expected = _expected_local_shape(got.placement, self.global_shapes[name], rank, self.spec.world_size)
            if tuple(got.shape) != expected:
                raise ModelError(
                    f"rank {rank}: {got.kind} {name} has local shape {tuple(got.shape)}, but its placement "
                    f"{_placement_str(got.placement)} (read from {got.source}) of the global shape "
                    f"{self.global_shapes[name]} gives {expected}: the model's sharding metadata does not match its "
                    "tensors; pass param_placements={name: ...} with the right layout.")


def _wrap(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not _is_dtensor(like):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


class _Forward(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, *batch):
        return self._fn(self.model, *batch)


def _run(spec: ModelSpec, model: nn.Module, names: Sequence[str], state: Mapping[str, StateInfo], *tensors):
    n = len(names)
    given, batch = tensors[:n], tensors[n:]
    current = named_state(model)
    swap, attrs = {}, []
    for name, t in zip(names, given):
        kind, orig = current[name]
        if kind == "attribute":
            mod_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(mod_name) if mod_name else model
            attrs.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, _wrap(t, orig))
        else:
            swap[f"model.{name}"] = _wrap(t, orig)
    wrapper = _Forward(model, spec.forward or _default_forward)
    try:
        out = torch.func.functional_call(wrapper, swap, tuple(batch), strict=False, tie_weights=True)
    finally:
        for owner, attr, old in reversed(attrs):
            setattr(owner, attr, old)
    outs = [_full(o) for o in _output_tensors(out)]
    if not spec.grads:
        return tuple(outs)
    loss = outs[0]
    if loss.dim() != 0 and loss.numel() != 1:
        raise ModelError(
            f"grads=True differentiates forward's first output, which must be a scalar loss, but it has shape "
            f"{tuple(loss.shape)}: return the loss first (e.g. forward=lambda m, x, y: m(x, labels=y).loss).")
    params = [t for name, t in zip(names, given) if state[name].trainable]
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return tuple(outs) + tuple(grads)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _output_tensors(out) -> list[torch.Tensor]:
    """forward's result as a list of tensors: a tensor, a tuple/list/dict of them, or a model output
    object (HF ``ModelOutput``: its non-None fields in order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    leaves = pytree.tree_leaves(out)
    if not leaves and hasattr(out, "to_tuple"):
        leaves = pytree.tree_leaves(out.to_tuple())
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors:
        raise ModelError(
            f"forward returned {type(out).__name__} with no tensors: return the tensors to verify (e.g. "
            "forward=lambda m, ids: m(ids).logits).")
    return tensors


# ----------------------------------------------------------------------------------- public API


def from_modules(
    sequential: Callable[[], nn.Module],
    distributed: Callable[[], nn.Module],
    inputs: Sequence[torch.Tensor],
    placements: Sequence[InputPlacement],
    world_size: int,
    forward: Callable[..., Any] | None = None,
    grads: bool = False,
    *,
    input_names: Sequence[str] | None = None,
    expect: Sequence[Any] | None = None,
    param_placements: Mapping[str, InputPlacement] | None = None,
    name: str | None = None,
    **problem_kwargs,
) -> Problem:
    """See the module docstring. ``expect`` constrains ``forward``'s outputs (one entry per output;
    None entries, or ``expect=None``, accept any clean relation); gradients are always expected in
    their parameter's placement."""
    from gg_notebook.adapters.frameworks import active_adapters

    inputs = tuple(inputs)
    placements = tuple(placements)
    if not callable(sequential) or not callable(distributed):
        raise ProblemError("from_modules needs sequential and distributed builders: functions that take no argument "
                           "and return the model (e.g. sequential=lambda: GPT(cfg), distributed=lambda: GPT(cfg, tp=W)).")
    if len(placements) != len(inputs):
        raise ProblemError(f"{len(inputs)} inputs but {len(placements)} placements: give one placement per batch tensor.")
    batch_names = tuple(input_names) if input_names is not None else _batch_names(forward, len(inputs))
    spec = ModelSpec(sequential, distributed, forward, bool(grads), int(world_size), batch_names,
                     dict(param_placements or {}), active_adapters())

    seq = _run_discovery(spec, (None, None))
    global_shapes = {n: s.shape for n, s in seq.state.items()}
    unknown = [n for n in spec.param_placements if n not in seq.state]
    if unknown:
        raise ModelError(f"param_placements names {', '.join(unknown)}, which the sequential model does not have "
                         f"(its tensors are {', '.join(list(seq.state)[:8])} ...).")
    rank0 = _run_discovery(spec, (0, global_shapes))
    names = list(seq.state)
    missing = [n for n in names if n not in rank0.state]
    extra = [n for n in rank0.state if n not in seq.state]
    if missing or extra:
        raise ModelError(
            "the two builders build different models: "
            + (f"rank 0's lacks {', '.join(missing[:5])}; " if missing else "")
            + (f"rank 0's has {', '.join(extra[:5])} that the sequential model lacks; " if extra else "")
            + "match parameter, buffer and tensor-attribute names (the rank's model is the sequential one, sharded).")
    for n in names:
        s, r = seq.state[n], rank0.state[n]
        if s.dtype != r.dtype:
            raise ModelError(f"{n} is {s.dtype} in the sequential model but {r.dtype} on rank 0: build both in the same dtype.")
        if s.trainable != r.trainable:
            raise ModelError(f"{n} is {'' if s.trainable else 'not '}trainable in the sequential model but "
                             f"{'' if r.trainable else 'not '}on rank 0: both must set requires_grad alike.")

    state_inputs = []
    for n in names:
        v = seq.values[n]
        if seq.state[n].trainable:
            v = v.requires_grad_(True)
        state_inputs.append(v)
    all_inputs = tuple(state_inputs) + inputs
    all_placements = tuple(rank0.state[n].placement for n in names) + placements
    ranks_program = ModuleProgram(spec, names, rank0.state, global_shapes, sequential=False)
    ranks_program.computed = {n: seq.values[n] for n in names if seq.state[n].kind != "parameter"}
    problem = Problem(
        sequential=ModuleProgram(spec, names, None, global_shapes, sequential=True),
        distributed=ranks_program,
        inputs=all_inputs, placements=all_placements, world_size=spec.world_size,
        input_names=tuple(names) + batch_names, name=name or "model", **problem_kwargs,
    )
    problem.meta["from_modules"] = {
        "state": {n: rank0.state[n] for n in names},
        "trainable": [n for n in names if seq.state[n].trainable],
        "grads": spec.grads,
        "adapters": [a.name for a in spec.adapters],
    }
    problem.meta["output_labels"] = OutputLabels(
        tuple(n for n in names if seq.state[n].trainable) if spec.grads else (), spec.grads)
    if expect is not None or spec.grads:
        grads_expect = tuple(rank0.state[n].grad_placement for n in names if seq.state[n].trainable) if spec.grads else ()
        problem.expect = ExpectAfterForward(None if expect is None else tuple(expect), grads_expect)
    return problem


@dataclass(frozen=True)
class OutputLabels:
    """Names of a from_modules problem's outputs: forward's (the loss first with grads), then one
    gradient per trainable parameter."""

    grads: tuple
    has_loss: bool

    def __call__(self, n_outputs: int) -> list[str]:
        n_fwd = max(0, n_outputs - len(self.grads))
        fwd = ["loss" if self.has_loss and k == 0 else f"forward output {k}" for k in range(n_fwd)]
        return fwd + [f"grad of {n}" for n in self.grads]


class ExpectAfterForward(tuple):
    """``expect`` of a `from_modules` problem before capture: forward's entries (``None``: any clean
    relation; how many outputs forward returns is known once the sequential model is captured), then
    one per gradient. `resolve` gives the plain tuple."""

    def __new__(cls, fwd: tuple | None, grads: tuple):
        obj = super().__new__(cls, ())
        obj.fwd, obj.grads = fwd, tuple(grads)
        return obj

    def resolve(self, n_outputs: int) -> tuple:
        n_fwd = n_outputs - len(self.grads)
        if self.fwd is None:
            return (None,) * n_fwd + self.grads
        if len(self.fwd) != n_fwd:
            raise ProblemError(
                f"expect has {len(self.fwd)} entries but forward returns {n_fwd} tensors: give one placement (or None) "
                "per output of forward; the gradients' placements follow from the parameters'.")
        return self.fwd + self.grads


def _batch_names(forward: Callable | None, n: int) -> tuple[str, ...]:
    names: list[str] = []
    if forward is not None:
        try:
            params = [p.name for p in inspect.signature(forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            names = params[1:1 + n]
        except (TypeError, ValueError):
            names = []
    names += [f"input{i}" for i in range(len(names), n)]
    return tuple(names)
