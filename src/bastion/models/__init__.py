"""Model zoo: plain-PyTorch architectures behind one registry.

>>> from bastion import models
>>> net = models.create("lenet5", num_classes=10)      # a Classifier taking inputs in [0, 1]
>>> models.list()

Each architecture file registers its factories with ``@register(name, ...)``; the factory
builds the bare network (which sees normalised inputs) and :func:`create` wraps it in a
:class:`~bastion.models.base.Classifier` with normalisation, bounds and metadata.
"""

from __future__ import annotations

import builtins

from typing import Any, Callable, Sequence

from torch import nn

from bastion.errors import ConfigError
from bastion.models.base import Classifier, as_classifier
from bastion.models.init import INITS, init_weights
from bastion.registry import Registry

#: name -> factory(num_classes=, in_channels=, input_size=, **arch_kwargs) -> nn.Module
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register = MODELS.register

# Architecture files register themselves on import; they are imported here and nowhere else.
from bastion.models import lenet, small_cnns, resnet, vgg, mobilenet  # noqa: E402,F401


def list() -> "builtins.list[str]":  # noqa: A001 - the registry API is list()/create()
    """Names of every registered model."""
    return MODELS.names()


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
) -> Classifier:
    """Build model ``name`` wrapped in a :class:`Classifier`.

    Args:
        name: registry name (see :func:`list`).
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
    import torch

    entry = MODELS.get(name)
    d = entry.defaults
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r} must be an integer >= 2")
    c = d.get("in_channels", 3) if in_channels is None else in_channels
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ConfigError(f"in_channels={in_channels!r} must be a positive integer")
    size = d.get("input_size", 32) if input_size is None else input_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any((not isinstance(v, int)) or v < 1 for v in hw):
        raise ConfigError(f"input_size={input_size!r} must be a positive int or (H, W)")
    fits = d.get("mean") is not None and len(d["mean"]) == c
    mean_: Sequence[float] = mean if mean is not None else (d["mean"] if fits else (0.5,) * c)
    std_: Sequence[float] = std if std is not None else (d["std"] if fits else (0.5,) * c)
    if len(mean_) != c or len(std_) != c:
        raise ConfigError(f"mean/std have {len(mean_)}/{len(std_)} channels but in_channels={c}")
    init = d.get("init") if init is None else init
    if init is not None and init not in INITS:
        raise ConfigError(f"init={init!r} is not one of {', '.join(INITS)}")
    import inspect

    accepted = inspect.signature(entry.factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        for key in arch_kwargs:
            if key not in accepted:
                options = [k for k in accepted if k not in ("num_classes", "in_channels", "input_size")]
                raise ConfigError(
                    f"model {name!r} has no option {key!r}; options: {', '.join(options) or 'none'}"
                )
    if seed is not None:
        torch.manual_seed(seed)
    net = entry.factory(num_classes=num_classes, in_channels=c, input_size=hw, **arch_kwargs)
    if init is not None:
        init_weights(net, init)
    clf = Classifier(
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


def for_dataset(name: str, dataset: Any, **kwargs: Any) -> Classifier:
    """Model ``name`` sized for ``dataset`` (an :class:`~bastion.data.ImageDataset`): its class
    count, channels, image size, and normalisation by its training statistics. ``kwargs`` go
    to :func:`create` (``init``, ``seed``, architecture options)."""
    c, h, w = dataset.shape
    return create(name, num_classes=dataset.num_classes, in_channels=c, input_size=(h, w),
                  mean=dataset.mean, std=dataset.std, **kwargs)


def from_spec(spec: dict[str, Any]) -> Classifier:
    """Rebuild a model from the ``spec`` that :func:`create` attached to it (weights are not
    restored: use :func:`bastion.train.checkpoint.load_model` for that)."""
    if isinstance(spec, dict) and "randomized" in spec:
        from bastion.defenses.randomized import RANDOMIZED  # defenses build on models, not the reverse

        return RANDOMIZED.get(str(spec["randomized"])).factory(spec)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"model spec {spec!r} must be a table with at least a 'name'")
    kw = {k: v for k, v in spec.items() if k not in ("name", "arch_kwargs", "init")}
    if "input_size" in kw:
        kw["input_size"] = tuple(kw["input_size"])
    kw.pop("front_end", None)
    kw.pop("aux", None)
    model = create(spec["name"], **kw, **dict(spec.get("arch_kwargs") or {}))
    if spec.get("front_end") or spec.get("aux"):
        from bastion import defenses  # defenses build on models, not the reverse

        if spec.get("front_end"):
            defenses.attach_front_end(model, dict(spec["front_end"]))
        for name, params in dict(spec.get("aux") or {}).items():
            defenses.attach_aux(model, name, dict(params))
    return model


__all__ = ["Classifier", "MODELS", "as_classifier", "create", "for_dataset", "from_spec", "init_weights", "list", "register"]
