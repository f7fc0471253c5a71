"""The one place that runs a Problem's programs for real, with real values (not traced, not verified).

- `inputs` — each rank's piece of the example inputs (``Partial()`` inputs split at random, seeded);
- `local_tensor` — all ranks in this process under ``LocalTensorMode`` (collectives computed across them);
- `gloo` — one forked process per rank on a gloo process group, rendezvous through a file store in a
  fresh temporary directory (no ports): the launcher `fork_ranks`, shared with
  `gg_notebook.capture.specialize`, and `run_gloo`, the example runner on top of it;
- `sequential` — the sequential program on the inputs;
- `outputs` — output leaves, combining the ranks' outputs per placement, the tolerance check;
- `compare` — the numeric check of a problem: the distributed outputs against the sequential ones.

Nothing here imports `gg_notebook.capture` (data flows capture -> ...; capture uses `gloo`).
"""
