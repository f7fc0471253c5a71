"""Run the public spelling suite (tests/spellings/programs_*.py, issue #8) and print a table per pattern.

For each pattern: correct spellings proved / expected, bugs refuted and localized / expected, and for
every case that misses its expectation the verdict, the stuck (or culprit) operator and line, and
the engine's detail. Every ``programs_*.py`` module of ``tests/spellings`` is discovered, so patterns
written by others land in the table without registration.

    python benchmarks/spelling_suite.py              # tables
    python benchmarks/spelling_suite.py --json       # ... and benchmarks/results/spelling_suite.json
    python benchmarks/spelling_suite.py -k ulysses   # only cases whose name contains "ulysses"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)  # this checkout's gg_notebook, not an installed one

PATTERN_ORDER = ["scalar", "constants", "movement", "canonical", "decomposition", "loss", "attention"]


def run(filter_: str | None = None, capture: str = "inprocess") -> list[dict]:
    from spellings import all_cases
    from spellings._case import check_case

    cases = all_cases()
    by_name = {c.name: c for c in cases}
    results: dict = {}
    rows = []

    def verify(c):
        if c.name not in results:
            t0 = time.perf_counter()
            try:
                results[c.name] = (c.verify(capture=capture), None, time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - a crash is a row of the table, not the end of the run
                results[c.name] = (None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
        return results[c.name]

    for c in cases:
        if filter_ and filter_ not in c.name:
            continue
        result, error, seconds = verify(c)
        twin = None
        if c.bug and c.twin is not None:
            twin = verify(by_name[c.twin])[0]
        if result is None:
            ok, message = False, f"error: {error}"
        else:
            ok, message = check_case(c, result, twin)
        cul = result.culprit if result is not None else None
        rows.append({
            "name": c.name, "pattern": c.pattern, "bug": c.bug, "assumed": list(c.assumed), "ok": ok,
            "message": message,
            "status": None if result is None else result.status.value,
            "culprit_op": cul.op if cul else None, "culprit_node": cul.node if cul else None,
            "culprit_source": cul.source if cul else None, "culprit_code": (cul.code or "").strip() if cul else None,
            "detail": cul.detail if cul else (error or ""),
            "input_relations": cul.input_relations if cul else {},
            "expected_xfail": c.missing, "world_size": c.world_size, "seconds": round(seconds, 3),
        })
    return rows


def table(rows: list[dict]) -> str:
    out = []
    patterns = sorted({r["pattern"] for r in rows},
                      key=lambda p: (PATTERN_ORDER.index(p) if p in PATTERN_ORDER else 99, p))
    total = {"proved": 0, "assumed": 0, "correct": 0, "localized": 0, "bugs": 0}
    out.append("| pattern | proved (+ assumed as expected) / correct | refuted+localized / bugs | s |")
    out.append("|---|---|---|---|")

    def cell(n_ok, n_assumed, n):
        return f"{n_ok - n_assumed}{f' + {n_assumed}' if n_assumed else ''} / {n}"

    for p in patterns:
        rs = [r for r in rows if r["pattern"] == p]
        good = [r for r in rs if not r["bug"]]
        bugs = [r for r in rs if r["bug"]]
        np_, nl = sum(r["ok"] for r in good), sum(r["ok"] for r in bugs)
        na = sum(bool(r["ok"] and r.get("assumed")) for r in good)
        total["proved"] += np_; total["assumed"] += na; total["correct"] += len(good)
        total["localized"] += nl; total["bugs"] += len(bugs)
        out.append(f"| {p} | {cell(np_, na, len(good))} | {nl} / {len(bugs)} | {sum(r['seconds'] for r in rs):.1f} |")
    out.append(f"| **all** | {cell(total['proved'], total['assumed'], total['correct'])} | "
               f"{total['localized']} / {total['bugs']} | {sum(r['seconds'] for r in rows):.1f} |")
    for p in patterns:
        bad = [r for r in rows if r["pattern"] == p and not r["ok"]]
        if not bad:
            continue
        out.append("")
        out.append(f"## {p}: {len(bad)} not as expected")
        for r in bad:
            kind = "bug" if r["bug"] else "correct"
            out.append(f"- {r['name']} ({kind}, W={r['world_size']}): {r['message']}")
            if r["culprit_op"]:
                out.append(f"    stuck/culprit: {r['culprit_op']} ({r['culprit_node']}) at {r['culprit_source']}: "
                           f"`{r['culprit_code']}`")
            if r["detail"]:
                out.append(f"    detail: {r['detail'][:400]}")
            for name, rels in (r["input_relations"] or {}).items():
                out.append(f"    input {name} = {'; '.join(rels[:2]) if rels else '<none>'}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/spelling_suite.json")
    ap.add_argument("-k", dest="filter", default=None, help="only cases whose name contains this")
    ap.add_argument("--capture", default="inprocess", choices=("inprocess", "auto"),
                    help="how ranks are traced (default inprocess, as in tests/test_spellings.py)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.filter, args.capture)
    print(table(rows))
    print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.1f} s")
    if args.json:
        path = os.path.join(ROOT, "benchmarks", "results", "spelling_suite.json")
        with open(path, "w") as f:
            json.dump({"cases": rows}, f, indent=1, default=str)
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
