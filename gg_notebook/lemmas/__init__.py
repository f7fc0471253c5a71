"""The lemma library. Importing this package registers every lemma (see `REGISTRY`)."""

from gg_notebook.lemmas.base import MATCHERS, REGISTRY, Lemma, LemmaCase, lemmas_for, register
from gg_notebook.lemmas import concat as _concat  # noqa: F401  (registers)
from gg_notebook.lemmas import partial as _partial  # noqa: F401  (registers)
from gg_notebook.lemmas import views as _views  # noqa: F401  (registers)
from gg_notebook.lemmas import vocab as _vocab  # noqa: F401  (registers)
from gg_notebook.lemmas import loss_reduce as _loss_reduce  # noqa: F401  (registers matchers)
from gg_notebook.lemmas import cross_entropy as _cross_entropy  # noqa: F401  (registers)
from gg_notebook.lemmas import ignore_mean as _ignore_mean  # noqa: F401  (registers matchers)
from gg_notebook.lemmas import ce_grad as _ce_grad  # noqa: F401  (registers matchers)
from gg_notebook.lemmas import scalar as _scalar  # noqa: F401  (registers)
from gg_notebook.lemmas import reduce_regroup as _reduce_regroup  # noqa: F401  (registers)
from gg_notebook.lemmas import complex_views as _complex_views  # noqa: F401  (registers)
from gg_notebook.lemmas import softmax as _softmax  # noqa: F401  (registers)
from gg_notebook.lemmas import ew_views as _ew_views  # noqa: F401  (registers)
from gg_notebook.lemmas import smoothing as _smoothing  # noqa: F401  (registers)
from gg_notebook.lemmas import domain_const as _domain_const  # noqa: F401  (registers)
from gg_notebook.lemmas import online_softmax as _online_softmax  # noqa: F401  (registers)
from gg_notebook.lemmas import attn_mask as _attn_mask  # noqa: F401  (registers)
from gg_notebook.lemmas import const_lookup as _const_lookup  # noqa: F401  (registers)
from gg_notebook.lemmas import pick as _pick  # noqa: F401  (registers)
from gg_notebook.lemmas import slice_shared as _slice_shared  # noqa: F401  (registers)
from gg_notebook.lemmas import sum_regroup as _sum_regroup  # noqa: F401  (registers)
from gg_notebook.lemmas import ew_fusion as _ew_fusion  # noqa: F401  (registers, and its matcher)
from gg_notebook.lemmas import pads as _pads  # noqa: F401  (registers)

__all__ = ["MATCHERS", "REGISTRY", "Lemma", "LemmaCase", "lemmas_for", "register"]
