"""Loss functions of gfss_hf, as pure functions on tensors.

Pre-training: `label_smoothed_cross_entropy` (RePRI convention) and the pixel-to-pixel contrastive loss with its
sampler. Few-shot fine-tuning: CE' and the distillation term.

This module imports only torch: the model file imports it relatively, and Hub repos exported with
`trust_remote_code` carry it beside the model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["label_smoothed_cross_entropy"]


def label_smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1, ignore_index: int = 255
) -> torch.Tensor:
    r"""
    Per-pixel cross-entropy with label smoothing, averaged over the labelled pixels.

    The target of a pixel labelled `y` is `q_y = 1 - epsilon` and `q_c = epsilon / (C - 1)` for every other class
    (RePRI's convention, which differs from `torch.nn.functional.cross_entropy(label_smoothing=...)`, where the
    smoothing mass is spread over all `C` classes including `y`).

    Args:
        logits (`torch.Tensor` of shape `(B, C, H, W)`):
            Unnormalised class scores, at the resolution of `labels`.
        labels (`torch.Tensor` of shape `(B, H, W)`, integer):
            Class indices in `[0, C)`, or `ignore_index`.
        epsilon (`float`, *optional*, defaults to 0.1):
            Smoothing mass, in `[0, 1)`. `0` gives plain cross-entropy.
        ignore_index (`int`, *optional*, defaults to 255):
            Label of pixels that do not contribute.

    Returns:
        `torch.Tensor`: scalar loss. When no pixel is labelled it is `0` (still attached to the graph).

    Example:

    ```python
    >>> logits = torch.randn(2, 3, 4, 4)
    >>> labels = torch.randint(0, 3, (2, 4, 4))
    >>> loss = label_smoothed_cross_entropy(logits, labels, epsilon=0.1)
    ```
    """
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits must be (B, C, H, W) and labels (B, H, W) with the same B; got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(
            f"logits {tuple(logits.shape[-2:])} and labels {tuple(labels.shape[-2:])} differ in size; upsample the "
            "logits to the label size first."
        )
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon={epsilon} must be in [0, 1).")
    num_classes = logits.shape[1]
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    log_probs = F.log_softmax(logits.float(), dim=1).permute(0, 2, 3, 1)[valid]  # (P, C)
    target = labels[valid].long()
    if bool((target < 0).any()) or bool((target >= num_classes).any()):
        bad = target[(target < 0) | (target >= num_classes)][0].item()
        raise ValueError(
            f"label {bad} is outside [0, {num_classes}) and is not ignore_index={ignore_index}; remap the labels "
            "to classifier rows (background 0, base 1..B) first."
        )
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    if epsilon == 0.0 or num_classes == 1:
        return nll.mean()
    others = -(log_probs.sum(1)) - nll  # sum of -log p_c over c != y
    loss = (1.0 - epsilon) * nll + epsilon / (num_classes - 1) * others
    return loss.mean()
