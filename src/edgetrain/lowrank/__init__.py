"""Low-rank gradient accumulation for on-device training (LRT, Gural et al.; LRT v1 §4, App. A/D/H).

- :class:`StreamingKroneckerSum`: rank-r streaming estimate L R^T of sum_i dz_i ⊗ a_i (SKS/OK),
  biased (top-r) or minimum-variance unbiased, optionally with 16-bit factors.
- :class:`MaxNorm`: the stateful gradient max-norm of LRT v1 App. D.
"""

from edgetrain.lowrank.maxnorm import MaxNorm
from edgetrain.lowrank.sks import StreamingKroneckerSum, kronecker_sum_aux_bits

__all__ = ["MaxNorm", "StreamingKroneckerSum", "kronecker_sum_aux_bits"]
