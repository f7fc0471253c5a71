"""Operator knowledge keyed by the full operator identity (the ATen OpOverload, never its name).

Each table answers a question about one overload *called with given arguments* and answers
``None`` when it cannot decide: an overload without a row has no fact, so no lemma that needs the
fact applies to it (exact lookup still does). Facts that hold only for some argument values (a
cast that widens, ``masked_fill`` with zero, a reduction without a narrowing ``dtype``) say so in
the row's condition, which reads the arguments by schema name.
"""

from gg_notebook.ops.linearity import Linearity, linear_args, linearity_row

__all__ = ["Linearity", "linear_args", "linearity_row"]
