"""Benchmark: capture once (trace rank 0, specialize the symmetric ranks) against tracing every rank.

Every measurement runs `gg.verify` once in a *fresh* interpreter (so peak RSS is that run's and no
cache carries over); each cell is measured ``--runs`` times (default 3) per variant and medians are
reported, with the ratio old / new:

  - ``old``: ``gg.verify(problem, capture_once=False)`` (every rank traced, as before issue 12)
  - ``new``: ``gg.verify(problem)`` (capture once)

Suites:

  gpt     the GPT grid of bench_gpt.py (hidden 768, FFN 3072, vocab 49152, seq 1536, batch 8, 16 heads),
          TP x layers, forward and forward+backward
  405b    the built-in GPT at a Llama-3-405B-like shape (hidden 16384, 128 heads, FFN 53248, vocab 128256,
          seq 4096, batch 1), TP8, meta tensors; layers 4 and 16 (``--layers``) -> seconds per layer and the
          126-layer total extrapolated linearly; ``--full`` also measures 126 layers once
  llama405b
          torchtitan's Llama 3 at the 405B shape through gg_notebook's torchtitan adapter (dim 16384,
          128 heads, 8 KV heads, FFN 53248 = torchtitan's compute_ffn_hidden_dim(16384, multiple_of=4096,
          ffn_dim_multiplier=1.2) as in its 405B flavor, vocab 128256, seq 4096, batch 1), torchtitan's own
          TP8 + sequence-parallel plan and loss-parallel cross-entropy (``tt.loss``; fwd_bwd: its gradients
          w.r.t. every parameter), parameters on the meta device (``tt.build(device="meta")``; the RoPE
          table computed for real), SDPA attention; layers 2 and 4 (``--layers``); default variant ``new``
          only. ``build_s`` is ``Problem.from_modules``'s time (both models built once to read their
          state), outside ``gg.verify``

    python benchmarks/bench_capture.py gpt --tp 2 4 8 --layers 1 8
    python benchmarks/bench_capture.py 405b --mode fwd fwd_bwd
    python benchmarks/bench_capture.py gpt --quick
    python benchmarks/bench_capture.py 405b --sp --variants new --runs 1   # TP8 + sequence parallelism
    python benchmarks/bench_capture.py llama405b --layers 2 4 --mode fwd fwd_bwd

Wall time on a shared machine is noisy: CPU seconds (this process and its capture children) are
reported too, with the highest 1-minute load average seen at the end of a run, and the new capture's
seconds of work per phase (``stats["capture"]["phases_s"]``: record, trace, copy, lower, the
representative's wait) summed over its processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

GPT = dict(hidden=768, heads=16, vocab=49152, seq=1536, batch=8, ffn=3072)
L405B = dict(hidden=16384, heads=128, vocab=128256, seq=4096, batch=1, ffn=53248)
LLAMA405B = dict(dim=16384, n_heads=128, n_kv_heads=8, ffn=53248, vocab=128256, seq=4096, batch=1)
KEYS = ("capture_s", "index_s", "inference_s", "judge_s", "total_s")


def run_one(cell: dict) -> dict:
    """Child: build the problem, verify once, return times, verdict, capture stats, peak RSS."""
    import resource

    sys.path.insert(0, str(ROOT))
    import gg_notebook as gg
    from gg_notebook.capture import fake_memo

    fake_memo.enabled = bool(cell.get("fake_memo", True))  # --no-fake-memo: every fake call to FakeTensorMode

    t0 = time.perf_counter()
    if cell.get("suite") == "llama405b":
        problem = llama_problem(cell)
    else:
        from gg_notebook.examples.gpt import make

        problem = make(cell["tp"], layers=cell["layers"], backward=cell["mode"] == "fwd_bwd", device="meta",
                       sequence_parallel=bool(cell.get("sp")), **cell["model"])
    build_s = time.perf_counter() - t0
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = gg.verify(problem, capture_once=cell["variant"] == "new")
    wall = time.perf_counter() - t0
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    st = result.stats
    out = {k: float(st.get(k, float("nan"))) for k in KEYS}
    out.update(wall_s=wall, build_s=build_s, status=str(result.status), load=os.getloadavg()[0],
               cpu_s=(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
               + (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime),
               cpu_self_s=r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
               peak_rss_mb=r1.ru_maxrss / 1024, peak_rss_children_mb=c1.ru_maxrss / 1024,
               capture=st.get("capture"))
    return out


def llama_problem(cell: dict):
    """torchtitan's Llama 3 (``cell["model"]`` sizes, ``cell["layers"]`` layers) with torchtitan's TP/SP
    plan of degree ``cell["tp"]``, parameters on meta, as a `gg.Problem.from_modules`."""
    import torch

    import gg_notebook as gg
    from gg_notebook.adapters import torchtitan as tt

    m, W = cell["model"], cell["tp"]
    with tt._import_shims():
        from torchtitan.models.common.feed_forward import compute_ffn_hidden_dim
    if m["dim"] == 16384 and compute_ffn_hidden_dim(16384, multiple_of=4096, ffn_dim_multiplier=1.2) != m["ffn"]:
        raise RuntimeError("the FFN size is not torchtitan's 405B one")
    cfg = tt.llama3_config(dim=m["dim"], n_layers=cell["layers"], n_heads=m["n_heads"], n_kv_heads=m["n_kv_heads"],
                           vocab_size=m["vocab"], hidden_dim=m["ffn"], max_seq_len=m["seq"])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m["vocab"], (m["batch"], m["seq"]), generator=g)
    labels = torch.randint(0, m["vocab"], (m["batch"], m["seq"]), generator=g)
    return gg.Problem.from_modules(
        sequential=lambda: tt.build(cfg, tp=1, device="meta"),
        distributed=lambda: tt.build(cfg, tp=W, sp=bool(cell.get("sp", True)), device="meta"),
        inputs=(tokens, labels), placements=(gg.Replicate(), gg.Replicate()), world_size=W,
        forward=tt.loss, grads=cell["mode"] == "fwd_bwd")


def launch(cell: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(cell)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    return {"error": "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])}


def measure(cell: dict, runs: int, timeout: float, variants=("old", "new")) -> dict:
    """Medians over ``runs`` fresh processes per variant, interleaved (old, new, old, new, ...)."""
    res: dict = {v: [] for v in variants}
    for _ in range(runs):
        for variant in variants:
            res[variant].append(launch(dict(cell, variant=variant), timeout))
    out = {}
    for variant, rs in res.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[variant] = {"error": rs[-1].get("error")}
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in (*KEYS, "wall_s", "cpu_s", "peak_rss_mb",
                                                              "peak_rss_children_mb") if all(k in r for r in ok)}
        for k in ("build_s", "cpu_self_s"):
            if all(k in r for r in ok):
                med[k] = statistics.median(r[k] for r in ok)
        med["samples"] = [{k: r.get(k) for k in ("total_s", "wall_s", "cpu_s", "cpu_self_s", "load", "status")}
                          for r in ok]
        med["status"] = sorted({r["status"] for r in ok})
        med["load"] = max(r.get("load", 0.0) for r in ok)  # 1-minute load average at the end of a run
        med["capture"] = ok[-1].get("capture")
        med["runs"] = len(ok)
        out[variant] = med
    return out


def _f(x, spec=".2f"):
    return "-" if x is None or x != x else format(x, spec)


def row(cell: dict, m: dict) -> str:
    o, n = m.get("old", {}), m.get("new", {})
    if not o or not n:  # one variant measured (--variants)
        v = n or o
        if "error" in v:
            return f"| {cell['mode']} | TP{cell['tp']} | {cell['layers']} | error: {v['error']} |"
        cap = v.get("capture") or {}
        old_s, new_s = (_f(v["total_s"]), "-") if o else ("-", _f(v["total_s"]))
        return (f"| {cell['mode']} | TP{cell['tp']} | {cell['layers']} | {old_s} | {new_s} | - | "
                f"{_f(v['capture_s'])} | {_f(v['index_s'])} / {_f(v['inference_s'])} / {_f(v['judge_s'])} | "
                f"{_f(v['cpu_s'], '.1f')} | {_f(max(v['peak_rss_mb'], v['peak_rss_children_mb']), '.0f')} | "
                f"{cap.get('traced', '-')}/{cell['tp']} | {','.join(v['status'])} |")
    if "error" in o or "error" in n:
        return f"| {cell['mode']} | TP{cell['tp']} | {cell['layers']} | error: {o.get('error') or n.get('error')} |"
    cap = n.get("capture") or {}
    return (f"| {cell['mode']} | TP{cell['tp']} | {cell['layers']} | {_f(o['total_s'])} | {_f(n['total_s'])} | "
            f"{_f(o['total_s'] / n['total_s'])}x | {_f(o['capture_s'])} / {_f(n['capture_s'])} | "
            f"{_f(n['index_s'])} / {_f(n['inference_s'])} / {_f(n['judge_s'])} | "
            f"{_f(o['cpu_s'], '.1f')} / {_f(n['cpu_s'], '.1f')} | "
            f"{_f(max(n['peak_rss_mb'], n['peak_rss_children_mb']), '.0f')} | "
            f"{cap.get('traced', '-')}/{cell['tp']} | {','.join(n['status'])} | "
            f"{_f(max(o.get('load', 0.0), n.get('load', 0.0)), '.1f')} | {_phases(cap)} |")


def _phases(cap: dict) -> str:
    """The new capture's seconds of work per phase (summed over processes) and the recordings' wall time."""
    ph = cap.get("phases_s") or {}
    parts = [f"{k[:-2]} {v:.1f}" for k, v in ph.items() if isinstance(v, (int, float))]
    if cap.get("record_s") is not None:
        parts.append(f"recordings in at {cap['record_s']:.1f} s")
    return ", ".join(parts) or "-"


HEAD = ("| mode | TP | layers | old total s | new total s | old/new | capture s old / new | "
        "new index / inference / judge s | CPU s old / new | new peak RSS MB | traced ranks | verdict | load (max) | "
        "new capture work s per phase |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", nargs="?", choices=["gpt", "405b", "llama405b"], default="gpt")
    ap.add_argument("--tp", type=int, nargs="+", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=None)
    ap.add_argument("--mode", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per variant and cell (median)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--full", action="store_true", help="405b: also measure the 126-layer model once")
    ap.add_argument("--quick", action="store_true", help="gpt: TP 2 x 1 layer, forward, one run")
    ap.add_argument("--sp", action="store_true",
                    help="Megatron sequence parallelism on top of TP (examples.gpt.make(sequence_parallel=True))")
    ap.add_argument("--variants", nargs="+", choices=["old", "new"], default=None,
                    help="which capture variants to run (default both; llama405b: new)")
    ap.add_argument("--no-fake-memo", action="store_true",
                    help="switch off capture.fake_memo (same-machine A/B of the memo in front of FakeTensorMode)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        print("@@RESULT " + json.dumps(run_one(json.loads(args.cell))), flush=True)
        return 0
    if args.variants is None:
        args.variants = ["new"] if args.suite == "llama405b" else ["old", "new"]
    if args.suite == "gpt":
        model = GPT
        tps = args.tp or [2, 4, 8]
        layers = args.layers or [1, 2, 4, 8]
        if args.quick:
            tps, layers, args.mode, args.runs = [2], [1], ["fwd"], 1
    elif args.suite == "llama405b":
        model = LLAMA405B
        tps = args.tp or [8]
        layers = args.layers or [2, 4]
        args.sp = True  # torchtitan's TP plan with sequence parallelism
    else:
        model = L405B
        tps = args.tp or [8]
        layers = args.layers or [4, 16]
    memo = not args.no_fake_memo
    cells = [dict(mode=m, tp=t, layers=l, model=model, sp=args.sp, suite=args.suite, fake_memo=memo)
             for m in args.mode for t in tps for l in layers]
    print(f"# capture-once benchmark, suite {args.suite}{' + SP' if args.sp else ''}"
          f"{'' if memo else ', fake memo off'}: {model}; {len(cells)} "
          f"cell(s) x {len(args.variants)} variant(s) x {args.runs} fresh processes", flush=True)
    doc = {"suite": args.suite, "model": model, "runs": args.runs, "sp": args.sp, "fake_memo": memo, "cells": []}
    for c in cells:
        m = measure(c, args.runs, args.timeout, args.variants)
        doc["cells"].append({"cell": c, "result": m})
        print(row(c, m), flush=True)
    if args.suite in ("405b", "llama405b") and args.full:
        for mode in args.mode:
            c = dict(mode=mode, tp=tps[0], layers=126, model=model, sp=args.sp, suite=args.suite, fake_memo=memo)
            m = measure(c, 1, args.timeout * 4, args.variants)
            doc["cells"].append({"cell": c, "result": m})
            print(row(c, m), flush=True)
    print("\n" + HEAD)
    for e in doc["cells"]:
        print(row(e["cell"], e["result"]))
    print()
    for line in growth(doc["cells"]):
        print(line)
    sp_tag = ("_sp" if args.sp and args.suite != "llama405b" else "") + ("" if memo else "_nomemo")
    out = Path(args.out or HERE / "results" / f"capture_{args.suite}{sp_tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nresults: {out}")
    return 0


def growth(cells: list[dict]) -> list[str]:
    """Seconds per added layer and per added rank, old and new, and the 126-layer extrapolation."""
    tot, cpu = {}, {}
    for e in cells:
        c, m = e["cell"], e["result"]
        for v in ("old", "new"):
            if "total_s" in m.get(v, {}):
                tot[(c["mode"], c["tp"], c["layers"], v)] = m[v]["total_s"]
                cpu[(c["mode"], c["tp"], c["layers"], v)] = m[v].get("cpu_s")
    lines = []
    # CPU seconds (all processes): on a loaded machine wall time is mostly waiting for a core
    for (mode, t, v) in sorted({(k[0], k[1], k[3]) for k in cpu}):
        ls = sorted(k[2] for k in cpu if k[:2] == (mode, t) and k[3] == v and cpu[k] is not None and k[2] != 126)
        if len(ls) > 1:
            a, b = cpu[(mode, t, ls[0], v)], cpu[(mode, t, ls[-1], v)]
            per = (b - a) / (ls[-1] - ls[0])
            lines.append(f"{mode} {v} TP{t}: {per:.3f} CPU s per layer ({ls[0]}->{ls[-1]} layers); 126 layers "
                         f"extrapolated: {a + per * (126 - ls[0]):.1f} CPU s")
    for mode in sorted({k[0] for k in tot}):
        for v in ("old", "new"):
            tps = sorted({k[1] for k in tot if k[0] == mode and k[3] == v})
            for t in tps:
                ls = sorted(k[2] for k in tot if k[0] == mode and k[1] == t and k[3] == v and k[2] != 126)
                if len(ls) > 1:
                    a, b = tot[(mode, t, ls[0], v)], tot[(mode, t, ls[-1], v)]
                    per = (b - a) / (ls[-1] - ls[0])
                    lines.append(f"{mode} {v} TP{t}: {per:.3f} s per layer ({ls[0]}->{ls[-1]} layers); "
                                 f"126 layers extrapolated: {a + per * (126 - ls[0]):.1f} s")
            layers = sorted({k[2] for k in tot if k[0] == mode and k[3] == v})
            for l in layers:
                ts = sorted(k[1] for k in tot if k[0] == mode and k[2] == l and k[3] == v)
                if len(ts) > 1:
                    a, b = tot[(mode, ts[0], l, v)], tot[(mode, ts[-1], l, v)]
                    lines.append(f"{mode} {v} L{l}: {(b - a) / (ts[-1] - ts[0]):.3f} s per added rank "
                                 f"(TP{ts[0]}->TP{ts[-1]})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
