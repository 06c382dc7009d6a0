"""Per-sample losses that attacks *ascend*: ``loss(logits, labels) -> (N,)``.

Targeted variants take the target labels in place of ``labels``; losses needing more (a fixed
target class per point for APGD-T, clean probabilities for TPGD) are built by the factories
below and passed to :meth:`bastion.attacks.base.AttackRun.loss_grad`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the true label (ascend to leave the class)."""
    return F.cross_entropy(logits, labels, reduction="none")


def ce_targeted(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Minus cross-entropy of the target (ascend to reach the target)."""
    return -F.cross_entropy(logits, targets, reduction="none")


def _other_max(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``max_{j != label} z_j`` per sample."""
    masked = logits.scatter(1, labels[:, None], float("-inf"))
    return masked.amax(dim=1)


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j - z_y`` (Carlini & Wagner's f6, without the clamp); > 0 means misclassified."""
    return _other_max(logits, labels) - logits.gather(1, labels[:, None]).squeeze(1)


def margin_targeted(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``z_t - max_{j != t} z_j``; > 0 means classified as the target."""
    return -margin(logits, targets)


def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, Eq. 6), untargeted:
    ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``, with ``pi`` the logits sorted in
    decreasing order. Shift- and scale-invariant in the logits. Needs >= 3 classes."""
    top = logits.sort(dim=1, descending=True).values
    return margin(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_to(targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Targeted DLR towards fixed ``targets`` (Croce & Hein 2020, Eq. 7), as a loss of the
    *true* labels: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``. Needs >= 4 classes.

    The returned function closes over ``targets``; when the attack shrinks its working set it
    must build a new one from the pruned targets.
    """

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        top = logits.sort(dim=1, descending=True).values
        z_y = logits.gather(1, labels[:, None]).squeeze(1)
        z_t = logits.gather(1, targets[:, None]).squeeze(1)
        return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)

    return loss


def kl_from(clean_logits: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """TRADES' loss (Zhang et al. 2019): ``KL(softmax(clean) || softmax(adv))`` per sample,
    for the clean logits given (the true labels are not used)."""
    p_clean = F.softmax(clean_logits, dim=1)
    log_p_clean = F.log_softmax(clean_logits, dim=1)

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (p_clean * (log_p_clean - F.log_softmax(logits, dim=1))).sum(dim=1)

    return loss
