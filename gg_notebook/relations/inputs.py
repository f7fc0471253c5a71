"""Input relations: what each rank's local input is (a term over the global input), and how the
global input is rebuilt from the ranks (the relation the engine starts from)."""

from __future__ import annotations

from torch.distributed.tensor import Partial, Replicate, Shard

from gg_notebook.problem import Layout, Problem, ProblemError
from gg_notebook.relations.expr import Expr, ExprStore


def global_atoms(problem: Problem, store: ExprStore) -> list[Expr]:
    return [
        store.atom(name, tuple(t.shape), t.dtype)
        for name, t in zip(problem.input_names, problem.inputs)
    ]


def rank_input_terms(problem: Problem, store: ExprStore, atoms: list[Expr], layout_terms=None) -> list[list[Expr]]:
    """``terms[r][i]``: rank r's local copy of input i as a term over the global inputs."""
    W = problem.world_size
    out: list[list[Expr]] = []
    for r in range(W):
        row = []
        for i, (g, p) in enumerate(zip(atoms, problem.placements)):
            if isinstance(p, Replicate):
                row.append(g)
            elif isinstance(p, Shard):
                d = p.dim % len(g.shape)
                n = g.shape[d] // W
                row.append(store.slice(g, d, r * n, (r + 1) * n))
            elif isinstance(p, Partial):
                row.append(store.atom(f"{problem.input_names[i]}#part{r}", g.shape, g.dtype))
            elif isinstance(p, Layout):
                if layout_terms is None or (r, i) not in layout_terms:
                    raise ProblemError(f"input {i} ({problem.input_names[i]}): layout was not traced")
                row.append(layout_terms[(r, i)])
            else:
                raise ProblemError(f"unsupported placement {p!r} for input {i}")
        out.append(row)
    return out
