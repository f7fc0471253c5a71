"""Benchmark: inference time alone (the engine's run, not capture) on the GPT grid's model, and its
ratio to another commit's.

Capture dominates `verify` (bench_gpt.py); this isolates what the engine's own changes cost. The
model is captured once (in this process), then inferred ``--repeat`` times; each run is timed in
CPU seconds of this process (so other load on the machine matters less than for wall time), and the
first (cold) run is reported apart from the median of the others.

    python benchmarks/bench_inference.py --tp 8 --layers 8 --mode fwd_bwd
    python benchmarks/bench_inference.py --tp 8 --layers 8 --baseline 4bd9fc7   # also that commit, same way
    python benchmarks/bench_inference.py --shape 405b --sp --tp 8 --layers 126 --repeat 2 \
        --no-induction-baseline                           # proof by induction over layers, against the walk
    python benchmarks/bench_inference.py --cells 2x1 2x8 4x4 8x1 8x8 --rounds 3 --baseline 4bd9fc7 \
        --out benchmarks/results/inference.json                                 # the README's grid

``--baseline COMMIT`` checks the commit out in a temporary git worktree and runs this same
measurement there (its own gg_notebook), then prints both and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = dict(hidden=768, vocab=49152, seq=1536, batch=8, ffn=3072)
SHAPES = {"gpt": None,  # the GPT grid's model (heads: 12, or 16 where 12 does not split)
          "405b": dict(hidden=16384, heads=128, vocab=128256, seq=4096, batch=1, ffn=53248)}


def measure(root: str, tp: int, layers: int, mode: str, repeat: int, shape: str = "gpt", sp: bool = False,
            induction: bool | None = None) -> dict:
    """Run in a fresh interpreter whose gg_notebook is ``root``'s. ``induction`` None: the commit's
    default (a commit before `engine.induction` has no such option)."""
    if SHAPES[shape] is None:
        model = f'heads=12 if 12 % {tp} == 0 else 16, **{MODEL!r}'
    else:
        model = f'**{SHAPES[shape]!r}'
    extra = "" if induction is None else f", induction={induction}"
    code = f"""
import sys, time, json
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)  # both commits alike: idle intra-op threads spinning on a loaded machine count as CPU time
import gg_notebook as gg
import gg_notebook.capture as C
from gg_notebook.engine import infer
from gg_notebook.examples.gpt import make
memo = {{}}
orig = C.capture_and_lower
def cached(problem, lower, mode_="auto", *a, **k):
    if "cap" not in memo:
        memo["cap"] = orig(problem, lower, "inprocess")
    return memo["cap"]
C.capture_and_lower = cached
times = []
orun = infer.Engine.run
def run(self, *a, **k):
    t = time.process_time()
    r = orun(self, *a, **k)
    times.append(time.process_time() - t)
    return r
infer.Engine.run = run
status = None
for i in range({repeat}):
    p = make({tp}, layers={layers}, backward={mode == "fwd_bwd"}, device="meta", sequence_parallel={sp}, {model})
    status = str(gg.verify(p, validate=False, concrete=False{extra}).status.value)
print("@@RESULT " + json.dumps({{"status": status, "times": times, "file": gg.__file__}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            rec = json.loads(line[len("@@RESULT "):])
            t = rec["times"]
            rec.update(cold_s=t[0], warm_median_s=statistics.median(t[1:]) if len(t) > 1 else t[0])
            return rec
    raise RuntimeError(f"measurement in {root} failed: {(p.stderr or p.stdout).strip()[-2000:]}")


def _combine(recs: list[dict]) -> dict:
    """Rounds of one measurement as one: cold = median of the rounds' first runs, warm = median of
    every other run."""
    colds = [r["times"][0] for r in recs]
    warms = [t for r in recs for t in r["times"][1:]] or colds
    return {"status": recs[0]["status"], "file": recs[0]["file"], "rounds": [r["times"] for r in recs],
            "cold_s": statistics.median(colds), "warm_median_s": statistics.median(warms)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--cells", nargs="+", default=None, metavar="TPxL",
                    help="several grid cells, e.g. 2x1 8x8 (instead of --tp/--layers)")
    ap.add_argument("--mode", choices=("fwd", "fwd_bwd"), nargs="+", default=["fwd", "fwd_bwd"])
    ap.add_argument("--repeat", type=int, default=5, help="inference runs per measurement (first one cold)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="fresh processes per measurement, alternating with the baseline's (other load on the "
                         "machine then affects both alike)")
    ap.add_argument("--baseline", default=None, help="a git commit to measure the same way")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt",
                    help="gpt: the GPT grid's model; 405b: hidden 16384, 128 heads, FFN 53248, vocab 128256, seq 4096")
    ap.add_argument("--sp", action="store_true", help="sequence parallelism on top of the tensor parallelism")
    ap.add_argument("--no-induction-baseline", action="store_true",
                    help="the baseline is this checkout with induction=False (engine/induction.py) instead of a commit")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cells = [tuple(int(v) for v in c.lower().split("x")) for c in args.cells] if args.cells else \
        [(args.tp, args.layers)]
    rows = []
    base_dir = None
    if args.baseline:
        base_dir = tempfile.mkdtemp(prefix="gg_baseline_")
        subprocess.run(["git", "worktree", "add", "--detach", "-f", base_dir, args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
    try:
        for tp, layers in cells:
            for mode in args.mode:
                here, base = [], []
                for k in range(args.rounds):
                    order = [(str(ROOT), here, None), (base_dir, base, None)] if base_dir else [(str(ROOT), here, None)]
                    if args.no_induction_baseline:
                        order = [(str(ROOT), here, True), (str(ROOT), base, False)]
                    for root, acc, ind in (order if k % 2 == 0 else order[::-1]):
                        acc.append(measure(root, tp, layers, mode, args.repeat, args.shape, args.sp, ind))
                rec = {"mode": mode, "tp": tp, "layers": layers, "here": _combine(here)}
                if base:
                    rec["baseline"] = _combine(base)
                rows.append(rec)
    finally:
        if base_dir:
            subprocess.run(["git", "worktree", "remove", "--force", base_dir], cwd=ROOT, capture_output=True)
    compared = bool(base_dir or args.no_induction_baseline)
    print("| mode | TP x layers | verdict | cold CPU s | warm median CPU s |"
          + (" baseline cold | baseline warm | ratio cold | ratio warm |" if compared else ""))
    print("|---|---|---|---|---|" + ("---|---|---|---|" if compared else ""))
    for r in rows:
        h = r["here"]
        line = f"| {r['mode']} | {r['tp']} x {r['layers']} | {h['status']} | {h['cold_s']:.3f} | {h['warm_median_s']:.3f} |"
        if compared:
            b = r["baseline"]
            line += (f" {b['cold_s']:.3f} | {b['warm_median_s']:.3f} | {h['cold_s'] / b['cold_s']:.2f}x | "
                     f"{h['warm_median_s'] / b['warm_median_s']:.2f}x |")
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps({"baseline": "induction=False" if args.no_induction_baseline
                                              else args.baseline, "shape": args.shape, "sp": args.sp, "rows": rows, "command": " ".join(sys.argv),
                                              "when": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
