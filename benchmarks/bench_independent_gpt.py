"""Benchmark: verify the independent Megatron-style GPT (benchmarks/independent_gpt.py).

Grid: (forward, forward+backward) x (TP 2, 4) x (layers 1, 2), small shapes (vocab 64, hidden 16,
4 heads, seq 8, batch 2), Megatron's fused QKV layout and tied LM head by default. For every cell it
prints the verdict, the operator where the proof is stuck (if any) with its detail, and the timings
(capture / index / inference / judge / concrete / validate / total, from ``result.stats``).

    python benchmarks/bench_independent_gpt.py                  # the grid
    python benchmarks/bench_independent_gpt.py --json           # also write results/independent_gpt.json
    python benchmarks/bench_independent_gpt.py --qkv stacked --untied --tp 2 --layers 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

TIME_KEYS = ("capture_s", "index_s", "inference_s", "judge_s", "concrete_s", "validate_s", "total_s")


def run_cell(mode: str, tp: int, layers: int, *, fused_qkv: bool, tie: bool) -> dict:
    import gg_notebook as gg
    from independent_gpt import make_problem

    problem = make_problem(tp, layers=layers, backward=mode == "fwd_bwd", fused_qkv=fused_qkv, tie=tie)
    t0 = time.perf_counter()
    result = gg.verify(problem)
    wall = time.perf_counter() - t0
    rec = {"mode": mode, "tp": tp, "layers": layers, "fused_qkv": fused_qkv, "tie": tie,
           "verdict": str(result.status), "wall_s": wall,
           "times": {k: float(result.stats[k]) for k in TIME_KEYS if k in result.stats}}
    eng_step = None
    culprit = result.culprit
    if culprit is not None:
        rec["stuck"] = str(culprit).splitlines()[0]
        eng_step = culprit
    outs = getattr(result, "outputs", None)
    if outs is not None:
        rec["outputs_related"] = sum(1 for o in outs if getattr(o, "ok", False))
        rec["outputs"] = len(outs)
    if eng_step is not None:
        rec["stuck_detail"] = str(eng_step)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mode", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    ap.add_argument("--qkv", choices=["fused", "stacked"], default="fused",
                    help="fused: Megatron's per-head [q|k|v] weight; stacked: [3, hidden, hidden] sharded on dim 1")
    ap.add_argument("--untied", action="store_true", help="a separate LM head instead of the token table")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/independent_gpt.json")
    ap.add_argument("--out", default=str(HERE / "results" / "independent_gpt.json"))
    args = ap.parse_args(argv)

    records = []
    head = ["mode", "TP", "layers", "verdict", "capture s", "inference s", "total s", "stuck at"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for mode in args.mode:
        for tp in args.tp:
            for layers in args.layers:
                try:
                    rec = run_cell(mode, tp, layers, fused_qkv=args.qkv == "fused", tie=not args.untied)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    rec = {"mode": mode, "tp": tp, "layers": layers, "verdict": "error",
                           "error": f"{type(exc).__name__}: {exc}"}
                records.append(rec)
                t = rec.get("times", {})
                cells = [mode, str(tp), str(layers), rec["verdict"], f"{t.get('capture_s', float('nan')):.2f}",
                         f"{t.get('inference_s', float('nan')):.3f}", f"{t.get('total_s', float('nan')):.2f}",
                         rec.get("stuck", rec.get("error", "")).replace("|", "/")[:110]]
                print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        import platform

        import torch

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "independent_gpt", "qkv": args.qkv, "tie": not args.untied,
                                   "environment": {"python": platform.python_version(), "torch": torch.__version__},
                                   "records": records}, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
