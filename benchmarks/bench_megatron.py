"""megatron-core GPTModel through `gg.Problem.from_modules`: TP 2/4 x sequence parallel off/on x forward /
forward+backward, verdict and seconds (capture / total of `gg.verify`). Needs megatron-core and einops
(``pip install -c constraints.txt '.[megatron]'``).

    python benchmarks/bench_megatron.py [--layers 2] [--heads 8] [--groups 4] [--tp 2 4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.adapters.megatron import initialize

V, S, B = 128, 8, 2


def build(tp, sp, layers, heads, groups):
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.core.transformer import TransformerConfig

    initialize(tp=tp)
    cfg = TransformerConfig(num_layers=layers, hidden_size=64, num_attention_heads=heads, num_query_groups=groups,
                            ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                            tensor_model_parallel_size=tp, sequence_parallel=sp and tp > 1)
    return GPTModel(cfg, gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=V,
                    max_sequence_length=S, position_embedding_type="rope")


def cell(W, sp, grads, layers, heads, groups):
    tokens, labels = torch.randint(0, V, (2, B, S), generator=torch.Generator().manual_seed(0))
    problem = gg.Problem.from_modules(
        sequential=lambda: build(1, False, layers, heads, groups), distributed=lambda: build(W, sp, layers, heads, groups),
        world_size=W, inputs=(tokens, labels), placements=(gg.Replicate(), gg.Replicate()),
        domains={"labels": range(V)}, grads=grads,
        forward=lambda model, tokens, labels: model(tokens, None, None, labels=labels).mean())
    t0 = time.perf_counter()
    r = gg.verify(problem)
    return r.status, r.stats.get("capture_s", 0.0), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    a = ap.parse_args()
    import megatron.core  # noqa: F401  (activates the adapter)

    print(f"GPTModel: {a.layers} layers, hidden 64, {a.heads} heads / {a.groups} query groups, seq {S}, batch {B}")
    print("| TP | SP | forward | forward+backward |\n|---|---|---|---|")
    for W in a.tp:
        for sp in (False, True):
            row = []
            for grads in (False, True):
                status, cap, total = cell(W, sp, grads, a.layers, a.heads, a.groups)
                row.append(f"{status}, {cap:.1f} / {total:.1f} s")
            print(f"| {W} | {'on' if sp else 'off'} | {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
