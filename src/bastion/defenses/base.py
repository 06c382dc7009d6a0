"""The bases of every defense, and the closed set of paper threat models a defense declares.

A defense declares, as data, the threat model its paper evaluates it under
(``paper_threat_model``, one of :data:`PAPER_THREAT_MODELS`):

* ``"white-box"`` -- the attacker crafts on the deployed model itself (the default);
* ``"submodel-crafting"`` -- seed 001's protocol for ULM and CLM: the attack is crafted on one
  randomly drawn submodel and the point is classified by another randomly drawn submodel;
* ``"expectation"`` -- the attacker crafts on the model's expected (averaged) output, as seed
  003 does for the bagging ensemble.

Evaluation code reads this declaration (``bastion.defenses.paper_threat_model(name)``) instead
of comparing defense names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bastion.data.base import ImageDataset
from bastion.errors import ConfigError
from bastion.models.base import Classifier, NormalizedClassifier
from bastion.train.objectives import Objective

#: the threat models a defense's paper may evaluate it under (see the module docstring)
PAPER_THREAT_MODELS = ("white-box", "submodel-crafting", "expectation")


def check_paper_threat_model(value: object, where: str = "paper_threat_model") -> str:
    """``value`` must be one of :data:`PAPER_THREAT_MODELS` (:class:`ConfigError` naming ``where``)."""
    if value not in PAPER_THREAT_MODELS:
        raise ConfigError(f"{where}: paper_threat_model={value!r} is not one of {', '.join(PAPER_THREAT_MODELS)}")
    return str(value)


def require_normalized(model: Classifier, defense: str) -> NormalizedClassifier:
    """``model`` as a :class:`NormalizedClassifier` (what :func:`bastion.models.create` returns):
    a defense that changes the network's input or adds modules to it needs one."""
    if not isinstance(model, NormalizedClassifier):
        raise ConfigError(f"defense {defense!r} needs a model built by bastion.models.create (a NormalizedClassifier), "
                          f"got {type(model).__name__}")
    return model


@dataclass(frozen=True)
class Defense(Objective):
    """A training-time defense: a training objective whose field defaults are its seed's, and
    optionally a front end put before the model (:meth:`prepare`).

    Subclasses implement :meth:`__call__` (``(loss, logits)`` of a batch; default: clean
    cross-entropy) and may use the :class:`Objective` hooks (``start_epoch``, ``after_step``,
    ``end_epoch``). Validation goes in ``__post_init__``, raising
    :class:`~bastion.errors.ConfigError` naming the field.
    """

    name: str = "defense"
    #: the threat model the defense's paper evaluates it under (one of PAPER_THREAT_MODELS)
    paper_threat_model: ClassVar[str] = "white-box"

    def prepare(self, model: Classifier, train_set: ImageDataset, *, progress: bool = False) -> Classifier:
        """Called once before training; a front-end defense returns the model to train
        (typically ``model`` with a front end attached; ``progress``: a bar for work of its own
        that takes long). Default: ``model`` unchanged."""
        return model

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def describe(self) -> dict[str, Any]:
        return {"defense": self.name, **super().describe()}


@dataclass(frozen=True)
class ModelDefense:
    """A defense that *builds a model* rather than a training objective: a random-submodel
    population, CLM, a bagging ensemble, SAP or a Multi-SAP vote. The result is a
    :class:`~bastion.models.random.RandomClassifier`.

    Subclasses implement :meth:`_fit` (train what the defense needs under ``out_dir`` and
    return the model) and :meth:`wrap` (build the defense from already-trained members, when
    that makes sense). :meth:`fit` adds the contract every caller relies on: the result is saved
    as an ordinary checkpoint at ``out_dir/final`` (loadable with
    :func:`bastion.train.checkpoint.load_model`), and a finished ``out_dir`` is loaded, not
    retrained, unless ``resume=False``.
    """

    name: str = "model-defense"
    #: the threat model the defense's paper evaluates it under (one of PAPER_THREAT_MODELS)
    paper_threat_model: ClassVar[str] = "white-box"

    def fit(
        self,
        make_model: Callable[[int], Classifier],
        train_set: ImageDataset,
        config: Any = None,
        *,
        out_dir: str | Path | None = None,
        resume: bool = True,
        progress: bool = True,
    ) -> Classifier:
        """Train the defense and return it.

        Args:
            make_model: ``seed -> fresh Classifier`` (the architecture of every member).
            train_set: training data. config: a :class:`~bastion.train.TrainConfig` for the members.
            out_dir: run directory (members' runs under it; the result at ``out_dir/final``);
                ``None`` trains without checkpoints.
        """
        from bastion.train.checkpoint import load_model, save_checkpoint
        from bastion.train.config import TrainConfig

        config = config if config is not None else TrainConfig()
        out = Path(out_dir) if out_dir is not None else None
        if out is not None and resume and (out / "final" / "meta.json").is_file():
            model, _ = load_model(out / "final")
            return model
        model = self._fit(make_model, train_set, config, out_dir=out, resume=resume, progress=progress)
        if out is not None:
            from bastion.config import to_dict

            save_checkpoint(out / "final", model, {
                "model": dict(model.spec), "defense": self.describe(), "config": to_dict(config),
                "dataset": {"name": train_set.name, "train_size": len(train_set)}, "final": True,
            })
        return model

    def _fit(self, make_model: Callable[[int], Classifier], train_set: ImageDataset, config: Any, *,
             out_dir: Path | None, resume: bool, progress: bool) -> Classifier:
        raise NotImplementedError

    def wrap(self, members: Sequence[Classifier]) -> Classifier:
        """The defense built around already-trained ``members``."""
        raise NotImplementedError(f"defense {self.name!r} cannot be built from trained members")

    def describe(self) -> dict[str, Any]:
        return {"defense": self.name, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}}


def prepare(defense: Any, model: Classifier, train_set: Any, *, progress: bool = False) -> Classifier:
    """``defense.prepare(model, train_set)``, with ``progress`` passed on when that method takes
    it (a defense registered outside Bastion may define the two-argument form of before)."""
    fn = defense.prepare
    try:
        params = dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # no signature to read
        params = {}
    if "progress" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(model, train_set, progress=progress)
    return fn(model, train_set)
