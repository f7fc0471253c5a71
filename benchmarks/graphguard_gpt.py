"""GraphGuard's published GPT graphs as a `gg.Problem` (``Problem.from_graphs``).

The graphs are GraphGuard's benchmark (arXiv 2508.09505, repository nyu-systems/Entangle, folder
examples/data/gpt), captured by its authors with TorchDynamo/AOT on GPUs: one single-device graph
and one graph per rank, ``paral{T}_layer{L}/fw.g0.r{R}.py``. They are read from where they are kept
(``GG_GRAPHGUARD`` or ``../shared/graphguard/gpt`` beside the project); never copied into it.

What the problem states is GraphGuard's own configuration (its ``verify_gpt.py``, as its README
gives it): the input relations by ``primals_i`` name, the loss ``div_2`` replicated, dropout as the
identity (an assumption every verdict lists), the lifted ``_tensor_constant`` values 0 (Megatron's
``masked_input[mask] = 0`` lines), and apex's fused layer norm given its definition. Token ids and
labels are declared in ``[0, V)``. The ``empty`` attention buffer needs no relation here:
``baddbmm(empty, ..., beta=0)`` does not read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

VOCAB = 98304
ROOT = Path(os.environ.get("GG_GRAPHGUARD", Path(__file__).resolve().parents[2] / "shared" / "graphguard" / "gpt"))
# GraphGuard's reported verification times (its artifact's reference figures, 16-core AMD EPYC 7302P,
# forward graphs), in seconds, by (TP, layers): only the cells its README states
REPORTED = {(2, 1): 13.6, (4, 1): 18.9, (8, 1): 52.8, (8, 8): 174.4, (2, 8): 68.0}


def fused_layer_norm_affine_fwd(x: Tensor, weight: Tensor, bias: Tensor, normalized_shape: list[int],
                                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """apex's fused layer norm: (out, mean, invvar) with invvar = rsqrt(biased variance + eps),
    the statistics flattened to one value per row."""
    out, mean, rstd = torch.ops.aten.native_layer_norm.default(x, normalized_shape, weight, bias, eps)
    return out, mean.reshape(-1), rstd.reshape(-1)


def available(tp: int, layers: int, root: Path = ROOT) -> bool:
    return (root / f"paral1_layer{layers}" / "fw.g0.r0.py").is_file() and \
        all((root / f"paral{tp}_layer{layers}" / f"fw.g0.r{r}.py").is_file() for r in range(tp))


def placements(layers: int) -> dict:
    """GraphGuard's input relations: 12 parameters per layer, offset k = 12 * l."""
    import gg_notebook as gg

    S0, S1, R = gg.Shard(0), gg.Shard(1), gg.Replicate()
    pl = {}
    for l in range(layers):
        k = 12 * l
        pl.update({f"primals_{i + k}": S0 for i in (4, 5, 10, 11)})
        pl.update({f"primals_{i + k}": S1 for i in (6, 12)})
        pl.update({f"primals_{i + k}": R for i in (7, 8, 9, 13, 14, 15)})
    pl["primals_1"] = S0  # word embeddings (vocab-parallel)
    pl[f"primals_{4 + 12 * layers}"] = S0  # output layer weight
    pl.update({f"primals_{i}": R for i in [2, 3] + list(range(5 + 12 * layers, 11 + 12 * layers))})
    return pl


def problem(tp: int, layers: int, root: Path = ROOT, ranks=None):
    """The GraphGuard cell (tp, layers); ``ranks`` replaces the rank graphs (paths or source)."""
    import gg_notebook as gg

    if ranks is None:
        ranks = [root / f"paral{tp}_layer{layers}" / f"fw.g0.r{r}.py" for r in range(tp)]
    return gg.Problem.from_graphs(
        root / f"paral1_layer{layers}" / "fw.g0.r0.py", ranks, placements(layers),
        outputs=["div_2"], expect=[gg.Replicate()], constants=lambda name: 0, random="identity",
        definitions={"apex::fused_layer_norm_affine_fwd": fused_layer_norm_affine_fwd},
        domains={f"primals_{6 + 12 * layers}": range(VOCAB), f"primals_{9 + 12 * layers}": range(VOCAB)},
        name=f"graphguard_gpt_tp{tp}_l{layers}")
