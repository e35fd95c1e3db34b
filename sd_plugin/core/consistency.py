"""KL consistency between predictions on clean and masked inputs.

``consistency_loss(clean, masked) = KL(p_clean || p_masked)`` averaged over the batch
(``batchmean``), computed in float32 from logits.

Example:
    >>> import torch
    >>> from sd_plugin import consistency_loss
    >>> logits = torch.randn(4, 10)
    >>> float(consistency_loss(logits, logits))
    0.0
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["consistency_loss"]


def consistency_loss(clean_logits: Tensor, masked_logits: Tensor, detach_clean: bool = True) -> Tensor:
    """``KL(softmax(clean) || softmax(masked))``, batchmean; ``(B, K), (B, K) -> ()``.

    Args:
        clean_logits: logits on the original inputs (the target distribution).
        masked_logits: logits on the masked inputs.
        detach_clean: stop the gradient into the clean branch (default, the cheap
            two-pass step); ``False`` back-propagates into both branches.
    """
    if clean_logits.shape != masked_logits.shape or clean_logits.dim() != 2:
        raise ValueError(
            f"expected two (B, K) logit tensors of equal shape, got {tuple(clean_logits.shape)} "
            f"and {tuple(masked_logits.shape)}."
        )
    target = clean_logits.detach() if detach_clean else clean_logits
    log_p_clean = F.log_softmax(target.float(), dim=-1)
    log_p_masked = F.log_softmax(masked_logits.float(), dim=-1)
    return F.kl_div(log_p_masked, log_p_clean, reduction="batchmean", log_target=True)
