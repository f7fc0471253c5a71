"""Numeric comparison with a tolerance that depends on the dtype (exact for integers and bools)."""

from __future__ import annotations

import contextlib

import torch

_RTOL = {torch.float64: 1e-8, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def max_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max absolute error, the scale it is judged against)."""
    if a.shape != b.shape:
        return float("inf"), 1.0
    if a.dtype.is_complex or b.dtype.is_complex:
        # complex values: compare (real, imaginary) pairs; a complex and a real tensor never agree
        # (casting complex to real would silently drop the imaginary parts)
        if not (a.dtype.is_complex and b.dtype.is_complex):
            return float("inf"), 1.0
        return max_error(torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj()))
    if not a.dtype.is_floating_point and not b.dtype.is_floating_point:
        return float((a != b).any()), 1.0
    a64, b64 = a.double(), b.double()
    both_inf = torch.isinf(a64) & torch.isinf(b64) & (torch.sign(a64) == torch.sign(b64))
    both_nan = torch.isnan(a64) & torch.isnan(b64)
    diff = (a64 - b64).abs().masked_fill(both_inf | both_nan, 0.0)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    finite = torch.isfinite(a64)
    scale = float(a64[finite].abs().max()) if finite.any() else 1.0
    return float(diff.max()) if diff.numel() else 0.0, max(scale, 1e-30)


BITWISE = False  # set by the concrete check in exact="bitwise" mode
REDUCTION = 1  # the largest reduction in the program (set by the concrete check): rounding grows with it
COARSEST = None  # the least precise float dtype the program computes in (set by the concrete check)


def coarsest_float(graph):
    """The float dtype with the largest rounding error among ``graph``'s values (None if none):
    a float64 result computed through float32 is only float32-accurate."""
    worst = None
    for n in graph.nodes:
        dt = getattr(n, "dtype", None)
        if dt is not None and dt.is_floating_point and dt in _RTOL:
            if worst is None or _RTOL[dt] > _RTOL[worst]:
                worst = dt
    return worst


@contextlib.contextmanager
def judged_as(graph, bitwise: bool):
    """Tolerances for comparing values of ``graph``'s program: bitwise or not, growing with its
    largest reduction and set by its least precise float dtype (restored afterwards)."""
    global BITWISE, REDUCTION, COARSEST
    previous = BITWISE, REDUCTION, COARSEST
    BITWISE, REDUCTION, COARSEST = bitwise, reduction_size(graph), coarsest_float(graph)
    try:
        yield
    finally:
        BITWISE, REDUCTION, COARSEST = previous


def reduction_size(graph) -> int:
    """The largest number of terms any operator of ``graph`` adds up (matmul contraction, sums,
    softmax / layer-norm rows, embedding-gradient tokens): floating-point error grows with it."""
    from gg_notebook.lemmas.dims import dim_roles

    best = 1
    for n in graph.nodes:
        if n.op != "call":
            continue
        shapes = [i.shape for i in n.inputs]
        try:
            roles = dim_roles(n.attrs, shapes, n.shape)
        except Exception:  # noqa: BLE001
            roles = None
        if not roles:
            continue
        for shape, rs in zip(shapes, roles):
            k = 1
            for size, r in zip(shape, rs):
                if r is None or r[0] in ("sum", "max", "min"):
                    k *= size
            best = max(best, k)
    return best


def close(a: torch.Tensor, b: torch.Tensor, dtype=None, bitwise: bool | None = None) -> bool:
    bitwise = BITWISE if bitwise is None else bitwise
    if bitwise:
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or (
            a.dtype.is_floating_point and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))))
    err, scale = max_error(a, b)
    if err == float("inf"):
        return False
    dtype = dtype or a.dtype
    if dtype.is_complex:
        dtype = torch.float64 if dtype == torch.complex128 else torch.float32 if dtype == torch.complex64 else torch.float16
    if not dtype.is_floating_point:
        return err == 0
    growth = max(1.0, (REDUCTION / 1024) ** 0.5)
    rtol = _RTOL.get(dtype, 1e-4)
    if COARSEST is not None:
        rtol = max(rtol, _RTOL[COARSEST])
    return err <= rtol * growth * max(scale, 1.0)
