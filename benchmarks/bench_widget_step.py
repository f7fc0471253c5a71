"""Wall time of a Step click in `SessionWidget` (session step + full re-render) on a large model.

The model is the benchmark's largest forward GPT (TP 8, 8 layers, hidden 768, 16 heads, vocab
49152, sequence 1536, batch 8, meta tensors). Building the session (capture + index) is not timed.

    python benchmarks/bench_widget_step.py                # 20 clicks, median / max
    python benchmarks/bench_widget_step.py --clicks 50 --skip 200 --no-graph
    python benchmarks/bench_widget_step.py --small        # mlp, for a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--skip", type=int, default=0, help="run this many steps (via the API) before timing")
    ap.add_argument("--no-graph", action="store_true", help="turn the graph view off")
    ap.add_argument("--small", action="store_true", help="the small mlp example instead of the big GPT")
    args = ap.parse_args()

    import gg_notebook as gg
    import gg_notebook.examples as ex
    from gg_notebook.widgets import SessionWidget

    t0 = time.perf_counter()
    if args.small:
        problem = ex.get("mlp").make(world_size=2)
    else:
        problem = ex.gpt.make(8, layers=8, hidden=768, heads=16, vocab=49152, seq=1536, batch=8, device="meta")
    s = gg.ProofSession(problem)
    prep = time.perf_counter() - t0
    if args.skip:
        s.run(max_steps=args.skip)
    t0 = time.perf_counter()
    w = SessionWidget(s, graph=not args.no_graph)
    build = time.perf_counter() - t0

    times = []
    for _ in range(args.clicks):
        if s.done:
            break
        t0 = time.perf_counter()
        w.step_button.click()
        times.append(time.perf_counter() - t0)
    # one click with a filter active, and one Run click to the end
    w.filter_text.value = "ln"
    t0 = time.perf_counter()
    w.step_button.click()
    filt = time.perf_counter() - t0
    w.filter_text.value = ""
    t0 = time.perf_counter()
    w.run_button.click()
    run = time.perf_counter() - t0
    out = {
        "problem": problem.name, "operators": s.progress[1], "prepare_s": round(prep, 2),
        "widget_build_s": round(build, 3), "clicks": len(times),
        "step_click_median_s": round(statistics.median(times), 4) if times else None,
        "step_click_max_s": round(max(times), 4) if times else None,
        "step_click_with_filter_s": round(filt, 4), "run_click_to_end_s": round(run, 2),
        "graph": type(w.graph_view).__name__ if w.graph_view is not None else None, "verdict": w.verdict() if s.done else None,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
