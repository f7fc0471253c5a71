"""gg_notebook: prove that a distributed PyTorch program refines its single-device specification.

Pipeline (data flows one way): capture -> ir -> relations/lemmas -> engine -> session -> widgets / cli.
"""

from torch.distributed.tensor import Partial, Replicate, Shard

from gg_notebook.problem import Layout, OnRank, Problem, ProblemError, RandomOpError
from gg_notebook.result import Culprit, Finding, OutputRelation, Result, Status
from gg_notebook.verify import verify
from gg_notebook.session import HintError, ProofSession
from gg_notebook.concrete.certificate import check_certificate

__all__ = [
    "Culprit", "check_certificate", "Finding", "HintError", "ProofSession", "Layout", "OnRank", "OutputRelation", "Partial", "Problem", "ProblemError", "RandomOpError",
    "Replicate", "Result", "Shard", "Status", "verify",
]
__version__ = "0.1.0"
