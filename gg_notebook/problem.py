"""The user's question: a sequential specification, its per-rank implementation, and input layouts.

`Problem` is plain data. `validate_problem` turns every mistake a user can make while writing one
into a `ProblemError` whose message names the input, the placement and the fix, so that nothing
deeper in the pipeline has to defend against malformed problems.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement


class ProblemError(ValueError):
    """A malformed `Problem`; the message says which input or placement and how to fix it."""


class RandomOpError(ProblemError):
    """A program uses randomness that `Problem.random` does not allow; names the operator, the
    program (``rank`` None: the sequential one) and the source line, and says what to do."""

    def __init__(self, message: str, *, op: str, rank: int | None, source: str | None) -> None:
        super().__init__(message)
        self.op, self.rank, self.source = op, rank, source


RANDOM_POLICIES = ("refuse", "identity")


@dataclass(frozen=True)
class Layout:
    """A custom input layout: ``fn(global_tensor, rank, world_size) -> local_tensor``.

    ``fn`` must only move data (indexing, slicing, cat, split, chunk, reshape, transpose). It is traced
    to derive how the global tensor is rebuilt from the ranks' locals; anything that computes values
    (arithmetic, randomness) is refused when the problem is verified.
    """

    fn: Callable[[torch.Tensor, int, int], torch.Tensor]
    name: str | None = None

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"Layout({self.name or getattr(self.fn, '__name__', 'fn')})"


InputPlacement = Placement | Layout


@dataclass(frozen=True)
class OnRank:
    """An output only rank ``rank`` holds (``expect`` only): the last pipeline stage's loss, the
    gradients of a stage's own parameters. That rank's output must equal the sequential output; the
    other ranks' outputs are not compared (return anything, e.g. an empty tensor)."""

    rank: int

    def __repr__(self) -> str:
        return f"OnRank({self.rank})"


@dataclass
class Problem:
    """A refinement question: does ``distributed`` on ``world_size`` ranks implement ``sequential``?

    ``inputs`` are global example tensors (only shapes and dtypes matter to the proof; values seed
    numeric checks). ``placements[i]`` says how rank r's local copy of ``inputs[i]`` derives from the
    global tensor: ``Replicate()``, ``Shard(d)`` (equal chunks along d, rank order), ``Partial()``
    (the locals sum to the global; rank 0 holds the global value, the others zeros when materialized)
    or a ``Layout``. ``expect[k]`` constrains how the ranks' k-th output relates to the sequential one.

    ``domains`` narrows the values an integer input may take, by input name: ``{"target":
    range(0, V)}`` says no target is ``ignore_index``. Without it an integer input ranges over
    everything the operators that read it accept (token ids in ``[0, V)``, class targets in
    ``[0, C)`` plus ``ignore_index``). A proof that relies on a declared domain lists it in
    ``Result.domain_assumptions``, and the example inputs are checked against it.

    ``random`` says what random operators mean (their values are never equal across programs):
    "refuse" (default) rejects any with an error naming it; "identity" verifies with evaluation
    semantics - dropout (``F.dropout``, ``nn.Dropout``, ``native_dropout``) is the identity on both
    sides, each site listed in ``Result.assumptions`` so the verdict is at most "assumed" - while any
    other random value (``torch.rand``, ``randn``, ``randperm``, ``bernoulli`` ...) is still refused.

    ``decompositions`` defines operators gg_notebook cannot see inside, by the operator:
    ``{torch.ops.mylib.fused_ln.default: fn}`` where ``fn`` takes the operator's arguments and
    returns its outputs in plain PyTorch (``None`` instead of ``fn`` keeps the operator opaque).
    Operators without a lemma are replaced by such definitions on both sides before the proof
    (PyTorch's own decompositions for ATen operators: SDPA, group norm, ...; see
    `gg_notebook.ir.decompose`); a custom operator with no definition is an error.
    """

    sequential: Callable[..., Any]
    distributed: Callable[..., Any]
    inputs: Sequence[torch.Tensor]
    placements: Sequence[InputPlacement]
    world_size: int
    expect: Sequence[Placement] | None = None
    name: str | None = None
    input_names: Sequence[str] | None = None
    meta: dict = field(default_factory=dict)
    domains: dict | None = None
    random: str = "refuse"
    decompositions: dict | None = None

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        self.placements = tuple(self.placements)
        if self.expect is not None:
            self.expect = tuple(self.expect)
        if self.input_names is None:
            self.input_names = tuple(_parameter_names(self.sequential, len(self.inputs)))
        else:
            self.input_names = tuple(self.input_names)
        if self.name is None:
            self.name = getattr(self.distributed, "__name__", "problem")
        self.domains = dict(self.domains or {})
        self.decompositions = dict(self.decompositions or {})

    def id_domains(self) -> dict:
        """``{input name: IdDomain}`` for the declared domains (validated by `validate_problem`)."""
        from gg_notebook.relations.domains import IdDomain

        return {name: IdDomain.of(d) for name, d in self.domains.items()}

    @classmethod
    def from_graphs(cls, sequential, ranks, placements, **kwargs) -> "Problem":
        """A problem whose programs are graphs captured elsewhere: ``torch.fx.GraphModule`` objects
        or their printed source (paths or text), one single-device graph and one per rank; see
        `gg_notebook.adapters.graphs.from_graphs` for ``outputs``, ``constants``, ``definitions``,
        ``groups``, ``domains``, ``random``..."""
        from gg_notebook.adapters.graphs import from_graphs

        return from_graphs(sequential, ranks, placements, **kwargs)

    @classmethod
    def from_modules(cls, sequential, distributed, inputs, placements, world_size, forward=None, grads=False,
                     **kwargs) -> "Problem":
        """A problem whose programs are models: ``sequential()`` builds the single-device model,
        ``distributed()`` (run in each rank's process group) builds that rank's shard;
        ``forward(model, *inputs)`` (default ``model(*inputs)``) is verified, and with ``grads=True``
        also the gradient of its scalar output with respect to every parameter. Parameters are
        inputs matched by name, placed as the model's metadata says (DTensor placements, megatron
        attributes, ...); see `gg_notebook.adapters.modules.from_modules`."""
        from gg_notebook.adapters.modules import from_modules

        return from_modules(sequential, distributed, inputs, placements, world_size, forward, grads, **kwargs)

    def local_inputs(self, rank: int, inputs: Sequence[torch.Tensor] | None = None) -> tuple:
        """The tensors rank ``rank`` receives, derived from (these or the example) global inputs."""
        inputs = self.inputs if inputs is None else inputs
        return tuple(
            local_input(t, p, rank, self.world_size) for t, p in zip(inputs, self.placements)
        )


def _parameter_names(fn: Callable, n: int) -> list[str]:
    try:
        params = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names = params[:n]
    names += [f"input{i}" for i in range(len(names), n)]
    return names


def local_input(t: torch.Tensor, placement: InputPlacement, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s local tensor for global ``t`` under ``placement``."""
    if isinstance(placement, Replicate):
        return t
    if isinstance(placement, Shard):
        return torch.chunk(t, world_size, dim=placement.dim)[rank]
    if isinstance(placement, Partial):
        # A canonical partial split: rank 0 holds everything. Numeric checks draw other splits.
        return t if rank == 0 else torch.zeros_like(t)
    if isinstance(placement, Layout):
        return placement.fn(t, rank, world_size)
    raise ProblemError(f"unsupported placement {placement!r}")


def validate_problem(problem: Problem) -> None:
    """Raise `ProblemError` naming the first malformed part of ``problem`` and how to fix it."""
    if not callable(problem.sequential):
        raise ProblemError("Problem.sequential must be a function (the single-device specification).")
    if not callable(problem.distributed):
        raise ProblemError("Problem.distributed must be a function (one rank's program).")
    if getattr(problem, "random", "refuse") not in RANDOM_POLICIES:
        raise ProblemError(
            f"random={problem.random!r}: use random=\"refuse\" (the default: a random operator is an error) or "
            f"random=\"identity\" (dropout as the identity, recorded as an assumption)."
        )
    if not isinstance(problem.world_size, int) or problem.world_size < 1:
        raise ProblemError(f"world_size must be a positive int, got {problem.world_size!r}.")
    n_in, n_pl = len(problem.inputs), len(problem.placements)
    if n_in != n_pl:
        raise ProblemError(
            f"{n_in} inputs but {n_pl} placements: give exactly one placement per input "
            f"(inputs are {', '.join(problem.input_names)})."
        )
    for which, fn in (("sequential", problem.sequential), ("distributed", problem.distributed)):
        n_params = _positional_arity(fn)
        if n_params is not None and n_params != n_in:
            raise ProblemError(
                f"the {which} function {getattr(fn, '__name__', '')}{_signature(fn)} takes {n_params} positional "
                f"arguments but {n_in} inputs were given: pass one input tensor (and one placement) per argument."
            )
    for i, (t, p) in enumerate(zip(problem.inputs, problem.placements)):
        name = problem.input_names[i]
        if not isinstance(t, torch.Tensor):
            raise ProblemError(f"input {i} ({name}) is a {type(t).__name__}, expected a torch.Tensor.")
        if isinstance(p, Shard):
            d = p.dim
            if t.dim() == 0:
                raise ProblemError(
                    f"input {i} ({name}) is a 0-dim tensor but its placement is Shard({d}): "
                    f"a scalar cannot be sharded; use Replicate() or Partial()."
                )
            if not -t.dim() <= d < t.dim():
                raise ProblemError(
                    f"input {i} ({name}) has shape {tuple(t.shape)} but its placement is Shard({d}): "
                    f"the shard dim must be in [0, {t.dim() - 1}]."
                )
            d = d % t.dim()
            if t.shape[d] % problem.world_size:
                raise ProblemError(
                    f"input {i} ({name}) has size {t.shape[d]} along dim {d}, which is not divisible by "
                    f"world_size={problem.world_size}: pad the input or pick another shard dim."
                )
        elif isinstance(p, Partial):
            if p.reduce_op not in ("sum",):
                raise ProblemError(
                    f"input {i} ({name}) has placement Partial({p.reduce_op!r}); only Partial('sum') inputs are supported."
                )
        elif not isinstance(p, (Replicate, Layout)):
            raise ProblemError(
                f"placement {i} ({name}) is {p!r}: use Replicate(), Shard(d), Partial() or gg.Layout(fn)."
            )
    _validate_domains(problem)
    _validate_decompositions(problem)
    if problem.expect is not None:
        for k, e in enumerate(problem.expect):
            if isinstance(e, OnRank) and not (isinstance(e.rank, int) and 0 <= e.rank < problem.world_size):
                raise ProblemError(
                    f"expect[{k}] is {e!r} but the ranks are 0..{problem.world_size - 1}: name the rank that holds output {k}.")
            if e is not None and not isinstance(e, (Replicate, Shard, Partial, Layout, OnRank)):
                raise ProblemError(
                    f"expect[{k}] is {e!r}: use Replicate(), Shard(d), Partial(), gg.Layout(fn), gg.OnRank(r) or None "
                    "(any clean relation) for each output."
                )


def _validate_decompositions(problem: Problem) -> None:
    decs = getattr(problem, "decompositions", None) or {}
    if not isinstance(decs, dict):
        raise ProblemError(f"decompositions must be a dict {{operator: function}}, got {type(decs).__name__}.")
    for op, fn in decs.items():
        if not isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise ProblemError(
                f"decompositions is keyed by {op!r}, which is not an operator: key each definition by the operator "
                f"as the programs call it, e.g. torch.ops.mylib.fused_ln.default (or torch.ops.mylib.fused_ln for "
                f"every overload).")
        if fn is not None and not callable(fn):
            raise ProblemError(
                f"decompositions[{op}] is {fn!r}: give a function that takes the operator's arguments and returns "
                f"its outputs, or None to keep the operator opaque.")


def _validate_domains(problem: Problem) -> None:
    from gg_notebook.relations.domains import IdDomain

    if not isinstance(problem.domains, dict):
        raise ProblemError(f"domains must be a dict {{input name: range(...)}}, got {type(problem.domains).__name__}.")
    for name, d in problem.domains.items():
        if name not in problem.input_names:
            raise ProblemError(
                f"domains names {name!r}, which is not an input (inputs are {', '.join(problem.input_names)}): "
                f"key each domain by the input's name.")
        t = problem.inputs[list(problem.input_names).index(name)]
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ProblemError(
                f"domains[{name!r}]: input {name} is a {str(t.dtype).replace('torch.', '')} tensor; domains are "
                f"for integer inputs (token ids, class targets).")
        try:
            dom = IdDomain.of(d)
        except Exception as exc:  # noqa: BLE001
            raise ProblemError(
                f"domains[{name!r}] = {d!r} is not a set of integers ({type(exc).__name__}: {exc}): use "
                f"range(lo, hi) or a list of ints.") from exc
        if len(dom) == 0:
            raise ProblemError(f"domains[{name!r}] is empty: give the values {name} may take, e.g. range(0, V).")


def validate_expect(problem: Problem, outputs: Sequence[Any]) -> None:
    """Check ``problem.expect`` against the sequential program's outputs (IR nodes with ``name``,
    ``shape``, ``source``): one placement per output, shard dims in range."""
    if problem.expect is None:
        return
    n_exp, n_out = len(problem.expect), len(outputs)
    if n_exp != n_out:
        names = ", ".join(f"{o.name} {tuple(o.shape)}" for o in outputs)
        raise ProblemError(
            f"expect has {n_exp} placements but the sequential program returns {n_out} outputs ({names}): "
            f"give exactly one placement per output, in order, or expect=None to accept any clean relation."
        )
    for k, (e, o) in enumerate(zip(problem.expect, outputs)):
        if e is not None and isinstance(e, Shard):
            nd = len(o.shape)
            at = f" (computed at {o.source})" if getattr(o, "source", None) else ""
            if nd == 0:
                raise ProblemError(
                    f"expect[{k}] is Shard({e.dim}) but output {k} ({o.name}){at} is a 0-dim tensor: "
                    f"a scalar cannot be sharded; use Replicate() or Partial()."
                )
            if not -nd <= e.dim < nd:
                raise ProblemError(
                    f"expect[{k}] is Shard({e.dim}) but output {k} ({o.name}){at} has shape {tuple(o.shape)}: "
                    f"the shard dim must be in [0, {nd - 1}]."
                )


def _signature(fn: Callable) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def _positional_arity(fn: Callable) -> int | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None  # optional params: cannot tell
    return n
