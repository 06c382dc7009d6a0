"""The lean path: adversarial examples for training, at the cost of their gradients.

Adversarial training needs only the examples. :func:`craft` runs an attack's update rule
through the engine without the work that only an evaluation needs:

* no clean check (the engine's forward pass over the clean points);
* no per-sample recording of successes and best iterates at each gradient pass;
* no final check: the last iterate is handed in (:meth:`AttackRun.finish`) without a forward;
* no result object, no fp32 re-check of low-precision successes (none is reported).

The budget and the bounds are enforced exactly as in the full path: every iterate goes through
the engine's projection. The examples are each point's **final iterate**, as Madry et al. (2018)
and Wong et al. (2020) train (with restarts, the last restart's). The full path returns, for a
point the attack broke and then lost, the last iterate that broke it instead.

Only attacks whose update rule reads no verdict of the engine (``Attack.lean``: FGSM, FFGSM,
R+FGSM, PGD, BIM, MI-FGSM, TPGD) run lean. Any other attack (APGD, C&W, DeepFool, FAB, Square,
L-BFGS) chooses its output from the engine's checks, so :func:`craft` runs it through the full
path and returns its ``x_adv``; :func:`runs_lean` says which path an attack takes.
"""

from __future__ import annotations

import torch
from torch import nn

from bastion.attacks.base import Attack, AttackRun, check_labels
from bastion.attacks.memory import halving, rng_snapshot
from bastion.models.base import as_classifier


class LeanRun(AttackRun):
    """An :class:`AttackRun` that keeps only each point's latest iterate: no success tracking,
    no forward for :meth:`finish`, no fp32 re-check."""

    def finish(self, x_adv: torch.Tensor) -> None:
        x_adv = self._enforce(x_adv)
        self.best.index_copy_(0, self.idx, x_adv.detach())

    def check(self, x_adv: torch.Tensor) -> torch.Tensor:
        """The logits the update rule asked for (a counted forward); the iterate is kept as the latest."""
        x_adv = self._enforce(x_adv)
        logits = super().check(x_adv)  # the projected tensor is recognised, not projected again
        self.best.index_copy_(0, self.idx, x_adv.detach())
        return logits

    def _record(self, x_adv: torch.Tensor, logits: torch.Tensor) -> None:
        """Nothing: the lean path tracks no success."""

    def _confirm(self, x_adv: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """No fp32 re-check: the lean path reports no success."""
        return logits


def runs_lean(attack: Attack) -> bool:
    """Whether :func:`craft` runs ``attack`` on the lean path (else through the full engine)."""
    return type(attack).lean


def craft(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Training examples for ``(x, y)`` against ``model``: each point's final iterate, inside the
    budget and the bounds (detached). ``attack`` runs to its last iterate whatever its
    ``early_stop`` says. The inputs and labels are checked as a full call checks them, the model
    is put in eval mode for the call and restored afterwards, and a CUDA out-of-memory error
    halves the batch, with a warning (:mod:`.memory`). See the module docstring for what is
    skipped and for attacks that cannot run lean."""
    if not runs_lean(attack):
        return attack(model, x, y, generator=generator, judged_by_caller=True).x_adv.detach()
    clf = as_classifier(model)
    clf.check_inputs(x, name="x")
    y = check_labels(y, x, clf, "y")
    attack = attack.with_budget(x, clf.bounds)

    def piece(i: int, j: int) -> torch.Tensor:
        run = LeanRun(clf, x[i:j], y[i:j], targeted=False, norm=attack.norm, eps=attack.eps, early_stop=False,
                      generator=generator, eot_samples=attack.eot_samples, precision=attack.precision)
        if attack.eps > 0:
            attack._run(run)
        return run.best.detach()

    was_training = clf.training
    clf.eval()
    try:
        return halving(piece, x.shape[0], torch.cat, snapshot=lambda: rng_snapshot(generator, x.device),
                       what=f"{attack.name} (training examples)")
    finally:
        clf.train(was_training)


__all__ = ["LeanRun", "craft", "runs_lean"]
