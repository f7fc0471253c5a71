"""Benchmark: verify a Megatron-style tensor-parallel GPT at GraphGuard's benchmark sizes.

Model: hidden 768, 12 heads, FFN 3072, vocabulary 49152 (vocab-parallel embedding, LM head and
cross-entropy), sequence 1536, micro-batch 8, built on the meta device
(``gg_notebook.examples.gpt.make(..., device="meta")``), for a grid of TP degrees x layers, forward
only and forward+backward.

Every grid cell runs in a fresh subprocess (so ``ru_maxrss`` is that cell's peak RSS and caches do
not leak between cells) with its own timeout; a failing or timed-out cell is recorded and the grid
goes on. Results go to a JSON file and markdown tables are printed.

    python benchmarks/bench_gpt.py --quick                 # smoke test: TP 2 x 1 layer
    python benchmarks/bench_gpt.py --mode fwd              # forward grid, TP {2,4,8} x layers {1,2,4,8}
    python benchmarks/bench_gpt.py --tp 8 --layers 8 --mode fwd --profile /tmp/prof   # cProfile one cell
    python benchmarks/bench_gpt.py --sp --quick            # TP + Megatron sequence parallelism

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MODEL = dict(hidden=768, heads=12, vocab=49152, seq=1536, batch=8, ffn=3072)

# GraphGuard artifact (forward, Megatron GPT, same sizes), seconds on a 16-core AMD EPYC.
GRAPHGUARD_FWD_S = {(2, 1): 13.6, (4, 1): 18.9, (8, 1): 52.8, (8, 8): 174.4}

TIME_KEYS = ("capture_s", "index_s", "inference_s", "judge_s", "total_s")
COUNT_KEYS = ("seq_nodes", "rank_nodes", "distributed_values", "lookups", "lemma_plans", "pushes")


# ----------------------------------------------------------------------------------- child side
def run_cell(cell: dict) -> dict:
    """Build and verify one grid cell ``repeat`` times in this process; return measurements."""
    import resource

    sys.path.insert(0, str(ROOT))
    t_import = time.perf_counter()
    import gg_notebook as gg
    from gg_notebook.examples.gpt import make

    import_s = time.perf_counter() - t_import
    runs = []
    status = None
    culprit = None
    counts: dict = {}
    profiler = None
    if cell.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    for _ in range(cell["repeat"]):
        t0 = time.perf_counter()
        problem = make(cell["tp"], layers=cell["layers"], backward=cell["mode"] == "fwd_bwd", device="meta",
                       sequence_parallel=bool(cell.get("sp")), **cell.get("model", MODEL))
        build_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        cpu0 = _cpu_s()
        if profiler is not None:
            profiler.enable()
        result = gg.verify(problem)
        if profiler is not None:
            profiler.disable()
        wall_s = time.perf_counter() - t1
        cpu1 = _cpu_s()
        st = result.stats
        run = {k: float(st.get(k, float("nan"))) for k in TIME_KEYS}
        run["build_s"] = build_s
        run["wall_s"] = wall_s
        # CPU seconds of this process and of the per-rank capture processes it forked
        run["cpu_self_s"], run["cpu_children_s"] = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        runs.append(run)
        status = str(result.status)
        culprit = str(result.culprit) if result.culprit is not None else None
        counts = {k: st[k] for k in COUNT_KEYS if k in st}
    if profiler is not None:
        out = Path(cell["profile"])
        out.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(out))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    peak_mb = peak_kb / (1024 * 1024) if sys.platform == "darwin" else peak_kb / 1024
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest capture process
    child_mb = child_kb / (1024 * 1024) if sys.platform == "darwin" else child_kb / 1024
    return {"status": status, "culprit": culprit, "runs": runs, "counts": counts,
            "peak_rss_mb": peak_mb, "peak_rss_children_mb": child_mb, "import_s": import_s,
            "capture_mode": result.stats.get("capture_mode"), "capture_workers": result.stats.get("capture_workers")}


def _cpu_s() -> tuple[float, float]:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


# ----------------------------------------------------------------------------------- parent side
def launch(cell: dict, timeout: float) -> dict:
    """Run ``cell`` in a fresh interpreter; never raises."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(cell)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    rec = dict(cell)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        rec.update(ok=False, verdict="timeout", error=f"no result within {timeout:.0f} s",
                   process_s=time.perf_counter() - t0)
        return rec
    rec["process_s"] = time.perf_counter() - t0
    payload = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            payload = json.loads(line[len("@@RESULT "):])
            break
    if proc.returncode != 0 or payload is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        rec.update(ok=False, verdict="error", error="\n".join(tail), returncode=proc.returncode)
        return rec
    runs = payload["runs"]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rec.update(ok=True, verdict=payload["status"], culprit=payload["culprit"], peak_rss_mb=payload["peak_rss_mb"],
               peak_rss_children_mb=payload.get("peak_rss_children_mb"), capture_mode=payload.get("capture_mode"),
               capture_workers=payload.get("capture_workers"),
               counts=payload["counts"], import_s=payload["import_s"], runs=runs, median=med)
    if cell["mode"] == "fwd" and not cell.get("sp") and (cell["tp"], cell["layers"]) in GRAPHGUARD_FWD_S:
        rec["graphguard_s"] = GRAPHGUARD_FWD_S[(cell["tp"], cell["layers"])]
    return rec


def _fmt(x, spec=".2f"):
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return format(x, spec)


def table(records: list[dict], mode: str) -> str:
    rows = [r for r in records if r["mode"] == mode]
    fwd = mode == "fwd"
    head = ["TP", "layers", "capture s", "index s", "inference s", "total s", "peak RSS MB", "verdict"]
    if fwd:
        head += ["GraphGuard s (16-core EPYC)", "GraphGuard / ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        m = r.get("median", {})
        cells = [str(r["tp"]), str(r["layers"]), _fmt(m.get("capture_s")), _fmt(m.get("index_s")),
                 _fmt(m.get("inference_s")), _fmt(m.get("total_s")), _fmt(r.get("peak_rss_mb"), ".0f"),
                 r["verdict"]]
        if fwd:
            gg = r.get("graphguard_s")
            tot = m.get("total_s")
            cells += [_fmt(gg, ".1f"), _fmt(gg / tot, ".1f") + "x" if gg and tot else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth(records: list[dict], mode: str) -> str:
    """Ratios showing how the total time grows with layers and with the TP degree."""
    tot = {(r["tp"], r["layers"]): r["median"]["total_s"] for r in records if r["mode"] == mode and r.get("ok")}
    parts = []
    tps = sorted({t for t, _ in tot})
    lays = sorted({l for _, l in tot})
    if lays and len(lays) > 1:
        l0, l1 = lays[0], lays[-1]
        for t in tps:
            if (t, l0) in tot and (t, l1) in tot and tot[(t, l0)] > 0:
                parts.append(f"total(TP{t},L{l1})/total(TP{t},L{l0}) = {tot[(t, l1)] / tot[(t, l0)]:.2f} "
                             f"(layers x{l1 / l0:g})")
    if tps and len(tps) > 1:
        t0, t1 = tps[0], tps[-1]
        for l in lays:
            if (t0, l) in tot and (t1, l) in tot and tot[(t0, l)] > 0:
                parts.append(f"total(TP{t1},L{l})/total(TP{t0},L{l}) = {tot[(t1, l)] / tot[(t0, l)]:.2f} "
                             f"(TP x{t1 / t0:g})")
    per_layer = []
    for t in tps:
        ls = sorted(l for (tt, l) in tot if tt == t)
        if len(ls) > 1:
            per_layer.append(f"TP{t}: {(tot[(t, ls[-1])] - tot[(t, ls[0])]) / (ls[-1] - ls[0]):.2f} s/layer")
    if per_layer:
        parts.append("marginal time per layer: " + ", ".join(per_layer))
    return "growth: " + ("; ".join(parts) if parts else "n/a (need more than one TP degree or layer count)")


def _git(*args) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def _environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor(), "platform": platform.platform(),
            "commit": _git("rev-parse", "HEAD") or os.environ.get("GG_BENCH_COMMIT"),
            # uncommitted changes to the package make the numbers hard to reproduce
            "dirty": bool(_git("status", "--porcelain", "--", "gg_notebook")) if _git("rev-parse", "HEAD") else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--mode", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    ap.add_argument("--repeat", type=int, default=1, help="verify runs per cell (median reported when > 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("--quick", action="store_true", help="smoke grid: TP 2 x 1 layer")
    ap.add_argument("--heads", type=int, default=None,
                    help="attention heads for every cell (default: 12, or 16 where 12 %% TP != 0, since a "
                         "Megatron split needs heads %% TP == 0 and 12 heads cannot be split over 8 ranks)")
    ap.add_argument("--profile", metavar="DIR", help="cProfile each cell's verify() into DIR/<cell>.prof")
    ap.add_argument("--sp", action="store_true",
                    help="Megatron sequence parallelism on top of TP (examples.gpt.make(sequence_parallel=True))")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (child process)
    args = ap.parse_args(argv)

    if args.cell:
        res = run_cell(json.loads(args.cell))
        print("@@RESULT " + json.dumps(res), flush=True)
        return 0

    if args.quick:
        args.tp, args.layers = [2], [1]
    model = dict(MODEL, heads=args.heads or MODEL["heads"])

    def heads_for(t):
        if args.heads:
            return args.heads
        return MODEL["heads"] if MODEL["heads"] % t == 0 else 16

    cells = [dict(mode=m, tp=t, layers=l, repeat=max(1, args.repeat), model=dict(model, heads=heads_for(t)),
                  sp=args.sp)
             for m in args.mode for t in args.tp for l in args.layers]
    substituted = sorted({t for t in args.tp if heads_for(t) != MODEL["heads"]}) if not args.heads else []
    if substituted:
        print(f"# note: TP {substituted} use 16 heads (head dim 48): 12 heads cannot be split over that many ranks",
              flush=True)
    if args.profile:
        for c in cells:
            c["profile"] = str(Path(args.profile).resolve() / f"{c['mode']}_tp{c['tp']}_l{c['layers']}.prof")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "gpt", "model": model, "started": _dt.datetime.now().isoformat(timespec="seconds"),
           "environment": _environment(), "options": {k: v for k, v in vars(args).items() if k != "cell"},
           "graphguard_fwd_s": {f"TP{t}xL{l}": s for (t, l), s in GRAPHGUARD_FWD_S.items()}, "cells": []}
    print(f"# GPT benchmark{' (TP + sequence parallelism)' if args.sp else ''}: {model}; {len(cells)} cell(s), "
          f"timeout {args.timeout:.0f} s each", flush=True)
    bad_tp = [t for t in args.tp if heads_for(t) % t]
    if bad_tp:
        print(f"# note: {model['heads']} heads are not divisible by TP {bad_tp}: each rank gets "
              f"{model['heads']} // TP heads, so those cells are not a valid Megatron split and cannot be proved",
              flush=True)
    for c in cells:
        rec = launch(c, args.timeout)
        doc["cells"].append(rec)
        m = rec.get("median", {})
        msg = (f"  {c['mode']:7s} TP{c['tp']} L{c['layers']}: {rec['verdict']}, total {_fmt(m.get('total_s'))} s "
               f"(capture {_fmt(m.get('capture_s'))}, inference {_fmt(m.get('inference_s'))}), "
               f"peak RSS {_fmt(rec.get('peak_rss_mb'), '.0f')} MB, process {rec['process_s']:.1f} s")
        if not rec["ok"]:
            msg += "\n    " + rec["error"].replace("\n", "\n    ")
        print(msg, flush=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out)  # partial results survive an interrupted grid
    doc["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    out.write_text(json.dumps(doc, indent=1))
    for mode in args.mode:
        print(f"\n## {'forward' if mode == 'fwd' else 'forward + backward'}\n")
        print(table(doc["cells"], mode))
        print("\n" + growth(doc["cells"], mode))
    if bad_tp:
        print(f"\nnote: heads {model['heads']} % TP != 0 for TP {bad_tp} (not a valid Megatron split)")
    culprits = {r["culprit"] for r in doc["cells"] if r.get("culprit")}
    if culprits:
        print("\nwhere proofs stopped (verdict unknown):")
        for c in sorted(culprits):
            print(f"  - {c}")
    print(f"\nresults: {out}")
    return 0 if all(r["ok"] for r in doc["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
