"""Soundness fuzzer, full run: mutate every subject's distributed program, verify, check against ground truth.

    python benchmarks/fuzz_soundness.py --jobs 2 --out benchmarks/results/fuzz_soundness.json
    python benchmarks/fuzz_soundness.py --mutants 300 --seed 1 --gloo-sample 20

Subjects are the built-in examples (specialized to their correct programs) and the hand-written
programs in ``tests/fuzz/programs``; operators are in ``tests/fuzz/mutators.py``; ground truth (real
runs on adversarial inputs, LocalTensorMode and gloo) in ``tests/fuzz/ground_truth.py``.

Counts printed: wrong programs (ground truth shows a mismatch) and of those PROVED (false proofs,
must be 0), refuted, unknown; crashing programs; correct programs (intended rewrites that ground
truth confirms, equivalent mutants and the unmutated baselines) and of those REFUTED (false
refutations, must be 0), proved, unknown. Every false proof / refutation / internal error goes to
the results JSON with its program source. Exit status 1 when any false proof or refutation was found.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import random
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)  # this checkout's gg_notebook, not an installed one

_GLOO_KEYS: frozenset = frozenset()


def _init_worker(gloo_keys):
    global _GLOO_KEYS
    _GLOO_KEYS = frozenset(gloo_keys)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)


def _run_one(key: str, seed: int) -> dict:
    from fuzz.evaluate import Case, evaluate

    t0 = time.perf_counter()
    try:
        rec = evaluate(Case.from_key(key), gloo="sample" if key in _GLOO_KEYS else "fallback", seed=seed).to_json()
    except Exception as e:  # noqa: BLE001 - a fuzzer bug must not end the run; it is reported
        rec = {"key": key, "outcome": "fuzzer_error", "verdict": "", "intent": "", "operator": "",
               "verdict_detail": f"{type(e).__name__}: {e}", "ground_truth": {}, "source": ""}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def select_cases(n: int | None, seed: int) -> list[str]:
    from fuzz.evaluate import enumerate_cases

    cases = enumerate_cases()
    base = [c for c in cases if c.edit is None]
    rest = [c for c in cases if c.edit is not None]
    random.Random(seed).shuffle(rest)
    if n is not None:
        rest = rest[:max(n - len(base), 0)]
    return [c.key for c in base + rest]


def _kind(rec: dict) -> str:
    gt = rec.get("ground_truth", {}).get("verdict")
    if rec["outcome"] in ("invalid", "fuzzer_error"):
        return rec["outcome"]
    if gt == "differs":
        return "wrong"
    if gt == "crash":
        return "crash"
    if gt == "agrees":
        return {"variant": "correct_variant", "baseline": "baseline", "wrong": "equivalent_mutant"}[rec["intent"]]
    return "other"


def summarize(records: list[dict]) -> dict:
    by_kind = collections.defaultdict(collections.Counter)
    for r in records:
        by_kind[_kind(r)][r["verdict"]] += 1
    fp = [r for r in records if r["outcome"] == "false_proof"]
    fr = [r for r in records if r["outcome"] == "false_refutation"]
    classes = collections.Counter(f"{r['subject']} / {r['operator']}" for r in fp)
    rclasses = collections.Counter(f"{r['subject']} / {r['operator']}" for r in fr)
    return {
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "false_proofs": len(fp),
        "false_refutations": len(fr),
        "internal_errors": sum(r["outcome"] == "internal_error" for r in records),
        "fuzzer_errors": sum(r["outcome"] == "fuzzer_error" for r in records),
        "false_proof_classes": dict(classes.most_common()),
        "false_refutation_classes": dict(rclasses.most_common()),
        "false_proof_operators": dict(collections.Counter(r["operator"] for r in fp).most_common()),
        "local_unsupported": sum(bool(r.get("ground_truth", {}).get("local_unsupported")) for r in records),
        "oracle_disagreements": [r["key"] + ": " + r["ground_truth"]["disagreement"] for r in records
                                 if r.get("ground_truth", {}).get("disagreement")],
    }


def _print_summary(s: dict, records: list[dict], wall: float, jobs: int) -> None:
    k = s["by_kind"]

    def line(name, label, bad_verdict=None):
        c = k.get(name, {})
        total = sum(c.values())
        parts = ", ".join(f"{v} {n}" for v, n in sorted(c.items(), key=lambda kv: -kv[1]))
        print(f"  {label:<34} {total:5d}   ({parts})")

    print(f"\ncases evaluated: {len(records)} in {wall:.0f}s wall with {jobs} job(s)")
    line("wrong", "wrong programs (ground truth)")
    print(f"    FALSE PROOFS (must be 0):        {k.get('wrong', {}).get('proved', 0) + k.get('crash', {}).get('proved', 0):5d}")
    line("crash", "crashing/deadlocking programs")
    line("correct_variant", "correct variants (rewrites)")
    line("equivalent_mutant", "equivalent mutants (excluded)")
    line("baseline", "unmutated correct programs")
    print(f"    FALSE REFUTATIONS (must be 0):   {s['false_refutations']:5d}")
    line("invalid", "invalid (cannot build / no domain)")
    print(f"  internal errors (findings): {s['internal_errors']}; fuzzer errors: {s['fuzzer_errors']}; "
          f"LocalTensorMode could not run {s['local_unsupported']} (gloo decided)")
    if s["oracle_disagreements"]:
        print(f"  local/gloo disagreements: {len(s['oracle_disagreements'])}")
    secs = [r.get("verify_seconds", 0) for r in records if "verify_seconds" in r]
    gts = [r.get("ground_truth_seconds", 0) for r in records if "ground_truth_seconds" in r]
    if secs:
        print(f"  verify: {sum(secs):.0f}s total, {sum(secs) / len(secs):.3f}s mean, {max(secs):.2f}s max; "
              f"ground truth: {sum(gts):.0f}s total, {sum(gts) / len(gts):.3f}s mean")
    if s["false_proof_classes"]:
        print("\nfalse proofs by subject / operator:")
        for c, n in s["false_proof_classes"].items():
            print(f"  {n:4d}  {c}")
    if s["false_refutation_classes"]:
        print("\nfalse refutations by subject / operator:")
        for c, n in s["false_refutation_classes"].items():
            print(f"  {n:4d}  {c}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", type=int, default=None, help="cases to evaluate (default: all enumerated)")
    ap.add_argument("--seed", type=int, default=0, help="case sampling and input draws")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--gloo-sample", type=int, default=20, help="cases also checked on real gloo processes")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fuzz_soundness.json"))
    ap.add_argument("--subject", action="append", default=None, help="only these subjects (repeatable; prefix match)")
    ap.add_argument("--sample", type=int, default=None,
                    help="after --subject: this many of its cases (the unmutated baselines always kept)")
    args = ap.parse_args(argv)

    keys = select_cases(args.mutants, args.seed)
    if args.subject:
        keys = [k for k in keys if any(k.startswith(s) for s in args.subject)]
    if args.sample is not None and args.sample < len(keys):
        base = [k for k in keys if k.endswith("|base")]
        rest = [k for k in keys if not k.endswith("|base")]
        picked = set(random.Random(args.seed).sample(rest, max(0, args.sample - len(base))))
        keys = [k for k in keys if k in picked or k.endswith("|base")]
    gloo_keys = random.Random(args.seed + 1).sample(keys, min(args.gloo_sample, len(keys)))
    print(f"{len(keys)} cases, {len(gloo_keys)} also on gloo, {args.jobs} job(s)", flush=True)

    t0 = time.perf_counter()
    records: list[dict] = []
    if args.jobs <= 1:
        _init_worker(gloo_keys)
        for i, k in enumerate(keys):
            records.append(_run_one(k, args.seed))
            _progress(i + 1, len(keys), records, t0)
    else:
        ctx = mp.get_context("fork")
        with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker,
                                    initargs=(gloo_keys,)) as pool:
            futs = [pool.submit(_run_one, k, args.seed) for k in keys]
            for i, f in enumerate(cf.as_completed(futs)):
                records.append(f.result())
                _progress(i + 1, len(keys), records, t0)
    wall = time.perf_counter() - t0
    records.sort(key=lambda r: r["key"])
    s = summarize(records)
    _print_summary(s, records, wall, args.jobs)

    findings = [r for r in records if r["outcome"] in ("false_proof", "false_refutation", "internal_error", "fuzzer_error")]
    compact = [{k: v for k, v in r.items() if k != "source"} for r in records]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "wall_seconds": round(wall, 1), "summary": s, "findings": findings,
                   "records": compact}, f, indent=1, default=str)
    print(f"\nresults: {args.out}")
    return 1 if s["false_proofs"] or s["false_refutations"] else 0


def _progress(i, n, records, t0):
    if i % 100 == 0 or i == n:
        fp = sum(r["outcome"] == "false_proof" for r in records)
        fr = sum(r["outcome"] == "false_refutation" for r in records)
        print(f"  {i}/{n}  {time.perf_counter() - t0:.0f}s  false proofs {fp}  false refutations {fr}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
