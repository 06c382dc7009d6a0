"""Building models: :func:`create` from a registry name, :func:`from_spec` from a checkpoint's spec.

``create`` builds the bare network of a registered architecture and wraps it in a
:class:`~bastion.models.base.NormalizedClassifier` (normalisation, bounds, metadata, and the
``spec`` that rebuilds it). ``from_spec`` rebuilds any model from its spec: an architecture,
optionally with a front end and auxiliary modules, or a random classifier -- the parts defined
by higher layers come from :mod:`bastion.models.components`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.models.base import Classifier, NormalizedClassifier
from bastion.models.components import attach_aux, attach_front_end, build_random
from bastion.models.init import INITS, init_weights
from bastion.models.registry import MODELS

_SIZE_ARGS = ("num_classes", "in_channels", "input_size")


def create(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    init: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int | None = None,
    **arch_kwargs: Any,
) -> NormalizedClassifier:
    """Build model ``name`` wrapped in a :class:`NormalizedClassifier`.

    Args:
        name: registry name (see :func:`bastion.models.list`).
        num_classes: number of output logits.
        in_channels: input channels; defaults to the entry's (1 for MNIST models, 3 otherwise).
        input_size: ``H`` or ``(H, W)``; defaults to the entry's (28 or 32).
        init: weight initialisation of conv and linear layers, one of
            ``xavier-normal``, ``kaiming-uniform``, ``kaiming-normal``, ``orthogonal``;
            ``None`` keeps the entry's default (PyTorch's, unless the entry says otherwise).
        mean, std: per-channel normalisation applied inside the model; default: the entry's
            when the channel count matches, else 0.5 / 0.5.
        seed: if given, the weights are drawn from ``torch.manual_seed(seed)``.
        arch_kwargs: architecture options (e.g. ``extra_skip=4`` for ``resnet18``).
    """
    entry = MODELS.get(name)
    d = entry.defaults
    c, hw = _sizes(d, num_classes, in_channels, input_size)
    mean_, std_ = _normalisation(d, c, mean, std)
    init = d.get("init") if init is None else init
    if init is not None and init not in INITS:
        raise ConfigError(f"init={init!r} is not one of {', '.join(INITS)}")
    _check_arch_kwargs(name, entry.factory, arch_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    net = entry.factory(num_classes=num_classes, in_channels=c, input_size=hw, **arch_kwargs)
    if init is not None:
        init_weights(net, init)
    clf = NormalizedClassifier(
        net,
        mean=mean_,
        std=std_,
        num_classes=num_classes,
        input_shape=(c, hw[0], hw[1]) if d.get("fixed_size", True) else None,
        arch=name,
    )
    # everything needed to build the same architecture again (stored in checkpoints)
    clf.spec = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": c,
        "input_size": [hw[0], hw[1]],
        "init": init,
        "mean": [float(v) for v in mean_],
        "std": [float(v) for v in std_],
        **({"arch_kwargs": dict(arch_kwargs)} if arch_kwargs else {}),
    }
    return clf


def _sizes(d: dict[str, Any], num_classes: Any, in_channels: Any, input_size: Any) -> tuple[int, tuple[int, int]]:
    """Checked ``(channels, (H, W))``, the entry's defaults ``d`` filling what is ``None``."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r} must be an integer >= 2")
    c = d.get("in_channels", 3) if in_channels is None else in_channels
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ConfigError(f"in_channels={in_channels!r} must be a positive integer")
    size = d.get("input_size", 32) if input_size is None else input_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any((not isinstance(v, int)) or v < 1 for v in hw):
        raise ConfigError(f"input_size={input_size!r} must be a positive int or (H, W)")
    return c, (hw[0], hw[1])


def _normalisation(d: dict[str, Any], c: int, mean: Sequence[float] | None,
                   std: Sequence[float] | None) -> tuple[Sequence[float], Sequence[float]]:
    """The given ``mean``/``std``, else the entry's when its channel count is ``c``, else 0.5."""
    fits = d.get("mean") is not None and len(d["mean"]) == c
    mean_: Sequence[float] = mean if mean is not None else (d["mean"] if fits else (0.5,) * c)
    std_: Sequence[float] = std if std is not None else (d["std"] if fits else (0.5,) * c)
    if len(mean_) != c or len(std_) != c:
        raise ConfigError(f"mean/std have {len(mean_)}/{len(std_)} channels but in_channels={c}")
    return mean_, std_


def _check_arch_kwargs(name: str, factory: Callable[..., nn.Module], arch_kwargs: dict[str, Any]) -> None:
    """Every architecture option must be a parameter of the factory (unless it takes ``**kwargs``)."""
    accepted = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        return
    for key in arch_kwargs:
        if key not in accepted:
            options = [k for k in accepted if k not in _SIZE_ARGS]
            raise ConfigError(f"model {name!r} has no option {key!r}; options: {', '.join(options) or 'none'}")


def for_dataset(name: str, dataset: Any, **kwargs: Any) -> NormalizedClassifier:
    """Model ``name`` sized for ``dataset`` (an :class:`~bastion.data.ImageDataset`): its class
    count, channels, image size, and normalisation by its training statistics. ``kwargs`` go
    to :func:`create` (``init``, ``seed``, architecture options)."""
    c, h, w = dataset.shape
    return create(name, num_classes=dataset.num_classes, in_channels=c, input_size=(h, w),
                  mean=dataset.mean, std=dataset.std, **kwargs)


def from_spec(spec: dict[str, Any]) -> Classifier:
    """Rebuild a model from the ``spec`` that :func:`create` (or a random kind) attached to it
    (weights are not restored: use :func:`bastion.train.checkpoint.load_model` for that).

    Front ends, auxiliary modules and random kinds are looked up in
    :mod:`bastion.models.components`, which ``bastion.defenses`` fills when imported."""
    if isinstance(spec, dict) and "randomized" in spec:
        return build_random(spec)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"model spec {spec!r} must be a table with at least a 'name'")
    kw = {k: v for k, v in spec.items() if k not in ("name", "arch_kwargs", "init", "front_end", "aux")}
    if "input_size" in kw:
        kw["input_size"] = tuple(kw["input_size"])
    model = create(spec["name"], **kw, **dict(spec.get("arch_kwargs") or {}))
    if spec.get("front_end"):
        attach_front_end(model, dict(spec["front_end"]))
    for name, params in dict(spec.get("aux") or {}).items():
        attach_aux(model, name, dict(params))
    return model


def build_members(spec: dict[str, Any]) -> list[Classifier]:
    """Rebuild (untrained) member classifiers from a random model spec's ``members``."""
    members = spec.get("members")
    if not isinstance(members, list) or not members:
        raise ConfigError(f"randomized spec {spec.get('randomized')!r} lists no members")
    return [from_spec(dict(m)) for m in members]


__all__ = ["build_members", "create", "for_dataset", "from_spec"]
