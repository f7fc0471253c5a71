"""Interactive proofs: `ProofSession` (usable without widgets), suggestions and hints."""

from gg_notebook.session.hints import HintError
from gg_notebook.session.session import ProofSession, RelationView
from gg_notebook.session.suggestions import Suggestion

__all__ = ["HintError", "ProofSession", "RelationView", "Suggestion"]
