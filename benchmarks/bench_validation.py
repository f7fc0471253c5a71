"""What translation validation costs: `gg.verify` with and without it on every built-in example.

Each example is verified in a fresh Python subprocess (so no capture cache is shared with other
examples), once untimed to warm up, then `--repeat` times with validation and `--repeat` times
without, alternating; the medians and the ratio of the validation
time to the whole verify are printed. Issue #7's budget is 25%.

    python benchmarks/bench_validation.py                     # every example, TP 2, median of 3
    python benchmarks/bench_validation.py --world-size 4 --examples gpt gpt_fwd_bwd --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import gg_notebook as gg
import gg_notebook.examples as E
name, ws, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"on": [], "off": [], "validate": [], "status": None}
gg.verify(E.get(name).make(world_size=ws))  # warm-up: imports, kernels and caches, not timed
for _ in range(repeat):
    for mode in ("on", "off"):
        p = E.get(name).make(world_size=ws)
        t = time.perf_counter()
        r = gg.verify(p, validate=(mode == "on"))
        out[mode].append(time.perf_counter() - t)
        if mode == "on":
            out["validate"].append(r.stats.get("validate_s", 0.0))
            out["status"] = r.status.value
            out["validated"] = r.stats.get("validated")
print(json.dumps(out))
"""


def main() -> None:
    import gg_notebook.examples as E

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", nargs="*", default=list(E.EXAMPLES))
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    rows = []
    print(f"{'example':22s} {'verdict':8s} {'verify s':>9s} {'no-validate s':>14s} {'validate s':>11s} {'share':>7s}")
    for name in args.examples:
        res = subprocess.run([sys.executable, "-c", CHILD, name, str(args.world_size), str(args.repeat)],
                             capture_output=True, text=True)
        if res.returncode:
            print(f"{name:22s} error: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
            continue
        d = json.loads(res.stdout.strip().splitlines()[-1])
        on, off, val = (statistics.median(d[k]) for k in ("on", "off", "validate"))
        share = val / on if on else 0.0
        rows.append({"example": name, "verdict": d["status"], "verify_s": on, "no_validate_s": off,
                     "validate_s": val, "share": share, "validated": d.get("validated")})
        print(f"{name:22s} {d['status']:8s} {on:9.3f} {off:14.3f} {val:11.3f} {share:7.1%}")
    if rows:
        print(f"largest share: {max(r['share'] for r in rows):.1%} (budget 25%)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
