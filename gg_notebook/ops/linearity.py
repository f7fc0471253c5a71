"""Which operators commute with a sum of partials, in which arguments, under which conditions.

``op(.., sum_i x_i, ..) == sum_i op(.., x_i, ..)`` is what lets a row-parallel result flow through
later operators before its all-reduce. It holds for an operator that is *linear* in that argument:

* ``separately``: linear in each listed argument on its own, the other arguments fixed (``mul``,
  ``mm``, the gradient argument of a backward op);
* ``jointly``: additive in all listed arguments together (``add``/``sub`` of two partial sums).
  Every listed argument must be a tensor: ``x + 1.0`` adds the constant to *every* partial, so a
  scalar operand makes ``add`` affine, not linear (the "bias added before the reduction" bug).

Never linear, whatever their name suggests: casts to a narrower or integer dtype, rounding
(``div`` with a ``rounding_mode``, ``round``, ``floor``), and every operator without a row here.
A row is registered per OpOverload: ``div.Tensor`` is linear in its dividend, ``div.Tensor_mode``
is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gg_notebook.relations.expr import OpSpec

aten = torch.ops.aten

Condition = Callable[[OpSpec, Sequence], bool]


@dataclass(frozen=True)
class Linearity:
    mode: str  # "jointly" | "separately"
    args: tuple[str, ...]  # schema names of the arguments the operator is linear in
    when: Condition | None = None  # extra condition on the call's arguments and operand dtypes
    condition: str = ""  # the condition in words

    def holds(self, spec: OpSpec, dtypes: Sequence) -> bool:
        return self.when is None or bool(self.when(spec, dtypes))


_TABLE: dict = {}


def _row(ops, mode: str, args: tuple[str, ...], when: Condition | None = None, condition: str = "") -> None:
    for op in ops:
        if op in _TABLE:
            raise RuntimeError(f"duplicate linearity row for {op}")
        schema_args = {a.name for a in op._schema.arguments}
        missing = [a for a in args if a not in schema_args]
        if missing:
            raise RuntimeError(f"{op}: no argument named {missing} in its schema")
        _TABLE[op] = Linearity(mode, args, when, condition)


# ---------------------------------------------------------------------------------- conditions
_FLOAT_WIDENING = {
    (torch.float16, torch.float32), (torch.float16, torch.float64),
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float64),
    (torch.float32, torch.float64),
}
_INT_ORDER = [torch.int8, torch.int16, torch.int32, torch.int64]


def keeps_values(src, dst) -> bool:
    """A cast from ``src`` to ``dst`` represents every value of ``src`` exactly (so it commutes
    with a sum): same dtype, a wider float, or a wider signed integer. Never to an integer from a
    float, never to bfloat16/half from a wider float."""
    if src is None or dst is None or src == dst:
        return src == dst and src is not None
    if (src, dst) in _FLOAT_WIDENING:
        return True
    if src in _INT_ORDER and dst in _INT_ORDER:
        return _INT_ORDER.index(dst) >= _INT_ORDER.index(src)
    if src == torch.uint8 and dst in (torch.int16, torch.int32, torch.int64):
        return True
    return False


def _slot_dtype(spec: OpSpec, dtypes: Sequence, name: str):
    i = spec.slot_of(name)
    return dtypes[i] if i is not None and i < len(dtypes) else None


def _cast_keeps(spec: OpSpec, dtypes: Sequence) -> bool:
    src = _slot_dtype(spec, dtypes, "self")
    dst = spec.arg("dtype")
    return keeps_values(src, src if dst is None else dst)


def _reduction_dtype_keeps(spec: OpSpec, dtypes: Sequence) -> bool:
    dst = spec.arg("dtype", None)
    if dst is None:
        return True
    return keeps_values(_slot_dtype(spec, dtypes, "self"), dst)


def _softmax_backward_keeps(spec: OpSpec, dtypes: Sequence) -> bool:
    return keeps_values(_slot_dtype(spec, dtypes, "grad_output"), spec.arg("input_dtype"))


def _fill_is_zero(spec: OpSpec, dtypes: Sequence) -> bool:
    v = spec.arg("value")
    return isinstance(v, (bool, int, float)) and v == 0


# ---------------------------------------------------------------------------------- rows
_row([aten.add.Tensor, aten.sub.Tensor], "jointly", ("self", "other"),
     condition="both operands are tensors (a Python scalar operand makes it affine)")
_row([aten.mul.Tensor], "separately", ("self", "other"))
_row([aten.mul.Scalar, aten.neg.default], "separately", ("self",))
_row([aten.div.Tensor, aten.div.Scalar], "separately", ("self",))  # not div.Tensor_mode: it rounds
_row([aten._to_copy.default], "separately", ("self",), _cast_keeps,
     "the cast keeps every value (same or wider float / integer dtype)")
_row([aten.threshold_backward.default, aten.gelu_backward.default, aten.silu_backward.default],
     "separately", ("grad_output",))
_row([aten.tanh_backward.default, aten.sigmoid_backward.default], "separately", ("grad_output",))
_row([aten.masked_fill.Scalar], "separately", ("self",), _fill_is_zero, "the fill value is zero")
_row([aten.mm.default, aten.bmm.default], "separately", ("self", "mat2"))
# (sum.default / mean.default are lowered to these: see ir.specs.reduce_spec)
_row([aten.sum.dim_IntList, aten.mean.dim], "separately", ("self",),
     _reduction_dtype_keeps, "no narrowing dtype= argument")
_row([aten._softmax_backward_data.default, aten._log_softmax_backward_data.default], "separately",
     ("grad_output",), _softmax_backward_keeps, "input_dtype keeps every value of the gradient")
_row([aten.native_layer_norm_backward.default], "separately", ("grad_out",))
_row([aten.embedding.default], "separately", ("weight",))
_row([aten.embedding_dense_backward.default], "separately", ("grad_output",))
_row([aten.nll_loss_backward.default], "separately", ("grad_output",))
# gradients of indexing: the gradient placed into zeros (slice_backward, select_backward)
_row([aten.slice_backward.default, aten.select_backward.default], "separately", ("grad_output",))


def linearity_row(spec: OpSpec) -> Linearity | None:
    return _TABLE.get(spec.target)


def linear_args(spec: OpSpec, dtypes: Sequence = ()) -> tuple[str, tuple[int, ...]] | None:
    """("jointly" | "separately", tensor slots) in which ``spec`` is linear, or None.

    ``dtypes[i]`` is the dtype of tensor slot i (casts and reductions with ``dtype=`` need it)."""
    row = _TABLE.get(spec.target)
    if row is None:
        return None
    try:
        if not row.holds(spec, dtypes):
            return None
        slots = [spec.slot_of(a) for a in row.args]
    except KeyError:
        return None
    if row.mode == "jointly":
        if any(s is None for s in slots):
            return None  # a scalar operand: affine, not linear
        return ("jointly", tuple(slots))
    slots = [s for s in slots if s is not None]
    return ("separately", tuple(slots)) if slots else None


def registered() -> dict:
    """Every row (for tests and documentation)."""
    return dict(_TABLE)
