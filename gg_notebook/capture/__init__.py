"""Capture: turn a `Problem` into value-semantics fx graphs (sequential + one per rank).

See programs.py (every program captured and lowered in its own process), forked.py (running
calls in forked children), tracing.py (make_fx + fake process group), source.py (user source
locations on nodes), collectives.py (collective_result nodes, CollectiveInfo, communicators,
cross-rank matching), errors.py.
"""

from gg_notebook.capture.collectives import CollectiveInfo, MatchedCollective, collective_result
from gg_notebook.capture.errors import CaptureError
from gg_notebook.capture.programs import LoweredProgram, capture_and_lower
from gg_notebook.capture.tracing import CapturedProgram, capture_layout, capture_problem

__all__ = [
    "CaptureError", "CapturedProgram", "CollectiveInfo", "LoweredProgram", "MatchedCollective",
    "capture_and_lower", "capture_layout", "capture_problem", "collective_result",
]
