"""Hand-written distributed programs, written as a user would, used as fuzzing subjects.

Each module defines ``sequential``, ``distributed`` (plus helpers), ``make(world_size, dtype, seed)``
returning a ``gg.Problem``, and module constants ``MUTABLE`` (the names the mutators may rewrite),
``CONFIGS`` ((world_size, dtype name) pairs) and ``INT_DOMAIN`` ("ids": integer inputs stay in range;
"targets": -100 ignore sentinels are valid too). They are read as text and loaded fresh per case.
"""
