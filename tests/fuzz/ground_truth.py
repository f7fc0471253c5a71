"""Ground truth, independent of the verifier: run the real programs on adversarial inputs and compare.

The distributed program runs under LocalTensorMode (all ranks in this process, collectives computed
across them) and, for a sample, on real gloo processes; when LocalTensorMode cannot run a program,
gloo decides. Every run uses a freshly loaded module (``make_problem()``), so module-level state starts
clean, as in a new process. Outputs are combined per ``problem.expect`` and compared with the
sequential outputs: same shape, same dtype, values within a tolerance that depends on the precision
the program computes in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from gg_notebook.problem import Problem
from gg_notebook.runners.compare import compare_outputs as runner_compare_outputs
from gg_notebook.runners.gloo import run_gloo
from gg_notebook.runners.local_tensor import run_local_tensor
from gg_notebook.runners.sequential import run_sequential

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------- inputs

# (label, float kind, int kind); the first is the problem's own inputs
DRAW_KINDS = (
    ("original", None, None),
    ("random", "randn", "uniform"),
    ("ties", "small_int", "boundary"),
    ("bf16_grid", "bf16_off", "repeat"),
    ("halves", "halves", "uniform"),
    ("random2", "randn", "boundary"),
    ("ties2", "small_int", "uniform"),
)


def _float_draw(t: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    shape = t.shape
    std = float(t.detach().double().std()) if t.numel() > 1 else 1.0
    std = std if math.isfinite(std) and std > 0 else 1.0
    if kind == "randn":
        x = torch.randn(shape, generator=g, dtype=torch.float64) * std + float(t.detach().double().mean())
    elif kind == "small_int":  # ties, zeros, negatives
        x = torch.randint(-2, 3, shape, generator=g).double()
    elif kind == "halves":  # round-half-to-even and floor disagree here
        x = torch.randint(-4, 4, shape, generator=g).double() + 0.5
    elif kind == "bf16_off":  # just off the bf16 grid: a bf16 cast moves every value
        base = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 * std).to(torch.bfloat16).double()
        x = base + base.abs().clamp_min(2.0 ** -8) * 2.0 ** -10 * torch.randint(1, 4, shape, generator=g).double()
    else:
        raise ValueError(kind)
    return x.to(t.dtype)


def _int_draw(t: torch.Tensor, kind: str, g: torch.Generator, world_size: int, sentinel: bool) -> torch.Tensor:
    lo, hi = int(t.min()), int(t.max())
    lo = min(lo, 0) if lo >= 0 else lo
    shape = t.shape
    if kind == "uniform":
        x = torch.randint(lo, hi + 1, shape, generator=g)
    elif kind == "boundary":  # partition boundaries of [0, hi + 1) and the ends
        n = hi + 1
        vals = sorted({v for r in range(world_size + 1) for v in (r * n // world_size - 1, r * n // world_size)
                       if lo <= v <= hi} | {lo, hi})
        idx = torch.randint(0, len(vals), shape, generator=g)
        x = torch.tensor(vals, dtype=torch.int64)[idx]
    elif kind == "repeat":  # one id everywhere but a few: frequencies matter
        x = torch.full(shape, int(torch.randint(lo, hi + 1, (), generator=g)), dtype=torch.int64)
        flat = x.view(-1)
        flat[: max(1, flat.numel() // 4)] = hi
    else:
        raise ValueError(kind)
    if sentinel:
        x = torch.where(torch.rand(shape, generator=g) < 0.3, torch.full_like(x, -100), x)
    return x.to(t.dtype)


def input_draws(problem: Problem, n: int, seed: int, int_domain: str = "ids") -> list[tuple[str, tuple]]:
    """Up to ``n`` input tuples: the problem's own, then random and adversarial ones (seeded)."""
    g = torch.Generator().manual_seed(seed)
    declared = problem.id_domains()  # an input's declared domain is the problem's precondition
    out = []
    for label, fkind, ikind in DRAW_KINDS[:n]:
        if fkind is None:
            draw = tuple(problem.inputs)
        else:
            draw = []
            for name, t in zip(problem.input_names, problem.inputs):
                if name in declared:
                    x = declared[name].sample(t.shape, g, dtype=t.dtype)
                elif t.dtype in _FLOATS:
                    x = _float_draw(t, fkind, g)
                elif t.dtype == torch.bool:
                    x = torch.rand(t.shape, generator=g) < 0.5
                else:
                    x = _int_draw(t, ikind, g, problem.world_size, int_domain == "targets")
                draw.append(x.detach().requires_grad_(t.requires_grad) if x.is_floating_point() else x)
            draw = tuple(draw)
        out.append((label, draw))
    return out


# ---------------------------------------------------------------------------------------- comparing


def _tolerance(problem: Problem, want: torch.Tensor):
    """(relative-to-scale, relative-elementwise) tolerance for an output of dtype ``want.dtype``."""
    floats = [t.dtype for t in problem.inputs if t.dtype in _FLOATS]
    low_inputs = any(d in (torch.bfloat16, torch.float16) for d in floats)
    if low_inputs:  # the program itself computes in 8/11-bit mantissas: partial sums round differently
        return 5e-2, 0.0
    if want.dtype in (torch.bfloat16, torch.float16):  # one final rounding: at most one ulp apart
        return 1e-12, 2.0 ** -7 if want.dtype == torch.bfloat16 else 2.0 ** -10
    if want.dtype == torch.float32 or torch.float32 in floats:
        return 2e-5, 0.0
    return 1e-10, 0.0


def mismatch(problem: Problem, got, want) -> str | None:
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return None if (got == want) else f"{got!r} != {want!r}"
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != {want.dtype}"
    if not want.dtype.is_floating_point:
        return None if torch.equal(got, want) else "integer values differ"
    if want.numel() == 0:
        return None
    g, w = got.double(), want.double()
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        return "NaN positions differ"
    inf = torch.isinf(w) | torch.isinf(g)
    if not torch.equal(g[inf], w[inf]):
        return "infinities differ"
    fin = ~(torch.isnan(w) | inf)
    if not fin.any():
        return None
    g, w = g[fin], w[fin]
    scale = max(float(w.abs().max()), 1.0)
    rtol_scale, rtol_elem = _tolerance(problem, want)
    err = (g - w).abs()
    bad = err > rtol_scale * scale + rtol_elem * w.abs()
    if bad.any():
        return f"max abs error {float(err.max()):.3g} (scale {scale:.3g})"
    return None


def compare_outputs(problem: Problem, seq: list, ranks: list[list]) -> str | None:
    return runner_compare_outputs(problem, seq, ranks, lambda got, want: mismatch(problem, got, want))


# ------------------------------------------------------------------------------------------ running


@dataclass
class GroundTruth:
    verdict: str  # "differs" | "agrees" | "crash" | "broken" (the sequential program fails everywhere) | "not run"
    detail: str = ""
    draw: str | None = None  # the input draw that showed the difference
    backends: list[str] = field(default_factory=list)  # "local" / "gloo" runs made
    local_unsupported: str | None = None  # why LocalTensorMode could not run it (gloo decided)
    disagreement: str | None = None  # local and gloo disagreed (gloo wins)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _gloo_safe(problem: Problem) -> Problem:
    """``run_gloo`` ships outputs as numpy arrays, which have no bfloat16: send those as int16 bit patterns."""
    from torch.utils import _pytree as pytree

    fn = problem.distributed

    def distributed(*args):
        leaves, spec = pytree.tree_flatten(fn(*args))
        leaves = [l.detach().view(torch.int16) if isinstance(l, torch.Tensor) and l.dtype == torch.bfloat16 else l
                  for l in leaves]
        return pytree.tree_unflatten(leaves, spec)
    return dataclasses.replace(problem, distributed=distributed)


def _gloo_restore(ranks: list[list], seq: list) -> list[list]:
    return [[o.view(torch.bfloat16) if isinstance(o, torch.Tensor) and o.dtype == torch.int16 and k < len(seq)
             and isinstance(seq[k], torch.Tensor) and seq[k].dtype == torch.bfloat16 else o
             for k, o in enumerate(r)] for r in ranks]


def _with_inputs(problem: Problem, inputs) -> Problem:
    return dataclasses.replace(problem, inputs=tuple(inputs))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def check(make_problem: Callable[[], Problem], draws: Sequence[tuple[str, tuple]], *, gloo: str = "fallback",
          gloo_timeout: float = 60.0) -> GroundTruth:
    """Run the programs on every draw. ``gloo``: "fallback" (only when LocalTensorMode fails), "sample"
    (also on the first two draws), "always" (gloo only)."""
    gt = GroundTruth("agrees")
    usable = 0
    for k, (label, inputs) in enumerate(draws):
        p = _with_inputs(make_problem(), inputs)
        try:
            seq = run_sequential(p)
        except Exception:
            continue  # the specification rejects these inputs: not in the domain
        usable += 1
        verdicts = []
        if gloo != "always":
            try:
                ranks = run_local_tensor(_with_inputs(make_problem(), inputs))
                verdicts.append(("local", compare_outputs(p, seq, ranks)))
                gt.backends.append("local")
            except Exception as exc:  # noqa: BLE001 - the oracle's limits, decided by gloo below
                gt.local_unsupported = gt.local_unsupported or _short(exc)
        if gloo == "always" or not verdicts or (gloo == "sample" and k < 2):
            gt.backends.append("gloo")
            try:
                ranks = run_gloo(_gloo_safe(_with_inputs(make_problem(), inputs)), timeout=gloo_timeout)
                ranks = _gloo_restore(ranks, seq)
                verdicts.append(("gloo", compare_outputs(p, seq, ranks)))
            except Exception as exc:  # noqa: BLE001 - the program crashed or deadlocked on real processes
                return GroundTruth("crash", _short(exc), label, gt.backends, gt.local_unsupported)
        if len(verdicts) == 2 and (verdicts[0][1] is None) != (verdicts[1][1] is None):
            gt.disagreement = f"draw {label}: local {verdicts[0][1] or 'match'}; gloo {verdicts[1][1] or 'match'}"
        msg = verdicts[-1][1]  # gloo when both ran: real processes are the truth
        if msg is not None:
            gt.verdict, gt.detail, gt.draw = "differs", msg, label
            return gt
    if usable == 0:
        return GroundTruth("broken", "the sequential program rejects every input draw")
    return gt
