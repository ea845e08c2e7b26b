"""Contrastive losses: one module per loss, each registered in ``align.registry.LOSSES``.

Every pairwise loss subclasses ``PairLoss`` (``base.py``), is called as ``loss(a, b, *,
logit_scale, valid=None, groups=None, negatives=None, negatives_mask=None) -> {"loss": scalar,
...named terms}`` and gathers its candidates across ranks itself (``gather.py``, ``pairs.py``).
A module holds only its loss's maths (the ``terms`` hook). Parameters are keyword-only and
typed; ``Loss.Config`` is the dataclass of them (made from the constructor) and
``Loss.from_config(config)`` builds the loss from one.

===================  =======================================================  ==================
``infonce``          symmetric InfoNCE / CLIP                                 infonce.py
``infonce_tiled``    the same, tiled (Inf-CL): O(tile^2) logit memory         infonce_tiled.py
``siglip``           sigmoid loss with learnable bias                         siglip.py
``siglip_tiled``     the same, tiled                                          siglip_tiled.py
``hcl``              hard-negative re-weighted, debiased InfoNCE              hcl.py
``vsepp``            VSE++ max-violation hinge (+ optional InfoNCE term)      vsepp.py
``sampled_softmax``  user -> item softmax with logQ correction (recommender)  sampled_softmax.py
``graded_infonce``   InfoNCE with graded positives per query (search logs)    graded_infonce.py
``graded_infonce_tiled`` the same, tiled: O(tile^2) logit memory             graded_tiled.py
===================  =======================================================  ==================

``base.py`` owns the signature, gathering and masks; the tiled kernels (custom autograd
Functions) live in ``tiled.py`` (torch) and ``tiled_triton.py`` (fused, for CUDA); ``ring.py``
passes feature blocks round the ranks for ``infonce_tiled``'s and ``siglip_tiled``'s
``exchange="ring"``.
"""
from align.losses.base import PairLoss
from align.losses.graded_infonce import GradedInfoNCE
from align.losses.graded_tiled import GradedInfoNCETiled
from align.losses.hcl import HardNegativeInfoNCE
from align.losses.infonce import InfoNCE
from align.losses.infonce_tiled import InfoNCETiled
from align.losses.siglip import SigLIP
from align.losses.siglip_tiled import SigLIPTiled
from align.losses.sampled_softmax import SampledSoftmax
from align.losses.vsepp import MaxViolation

__all__ = ["PairLoss", "InfoNCE", "InfoNCETiled", "SigLIP", "SigLIPTiled", "HardNegativeInfoNCE", "MaxViolation", "SampledSoftmax",
           "GradedInfoNCE", "GradedInfoNCETiled"]
