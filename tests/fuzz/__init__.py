"""Soundness fuzzer: mutate distributed programs, establish ground truth by running them, compare with gg.verify.

Modules (data flows one way):
  programs/        hand-written user programs (one module each: ``sequential``, ``distributed``, ``make``)
  subjects.py      what can be mutated: the built-in examples and the hand-written programs
  loader.py        turn (mutated) source text into a fresh module backed by a real file
  mutators.py      AST mutation operators (wrong-intended mutants and semantics-preserving variants)
  ground_truth.py  run the real programs (LocalTensorMode, gloo) on adversarial inputs; verdict-free
  evaluate.py      one case: build, verify, ground truth, classify
  seeds.py         regression programs ("fuzz seeds") found by earlier runs

Imported as the top-level package ``fuzz`` (``tests/`` on ``sys.path``: pytest's rootdir insertion, or
``benchmarks/fuzz_soundness.py`` which inserts it).
"""
