"""A user's own network as a Bastion :class:`~bastion.models.base.Classifier`.

Peer libraries are asked this more than anything else: "how do I evaluate *my* model?" A
network built elsewhere may return a dict, a tuple, an object with ``.logits``, one logit of a
binary classifier, or probabilities, and may expect normalised inputs. :func:`wrap` turns it
into a classifier on inputs in ``bounds`` whose output is logits, from what the user declares:

* ``output``: what the module returns, one of :data:`OUTPUTS` --
  ``"logits"`` (as they are), ``"probabilities"`` (their log is used as logits: a softmax
  model's probabilities often saturate, so gradient attacks through them are weak, and the audit
  flags it), ``"binary-logit"`` (one logit ``z`` of class 1 becomes the two logits ``[0, z]``,
  whose softmax is ``[1 - sigmoid(z), sigmoid(z)]``);
* ``key``: where the output sits in what the module returns -- a dict key or attribute name
  (``"logits"``), or a tuple index (``0``); by default an object with a ``.logits`` attribute
  (as Hugging Face models return) is read through it;
* ``mean`` / ``std``: normalisation applied inside the classifier (inputs stay in ``bounds``);
* ``input_shape``: ``(C, H, W)`` the network expects (checked on every attack call);
* ``random``: the forward pass is random at evaluation time (then it is evaluated with EOT and a
  majority of ``k`` queries: see :mod:`bastion.models.random`).

:func:`load_module` builds the network from a factory (``path/to/file.py:build`` or
``package.module:build``), a TorchScript archive, or a hub (``timm:NAME``, ``hf:DIR``:
:mod:`bastion.models.hub`), and :func:`load_weights_file` loads weights
from safetensors or from a PyTorch state dict read with ``weights_only=True`` -- never a full
unpickle of a file a user hands us.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.errors import ConfigError, InputError
from bastion.models import hub
from bastion.models.base import Classifier

#: what a user's module may return (see the module docstring)
OUTPUTS = ("logits", "probabilities", "binary-logit")


class OutputAdapter(nn.Module):
    """``module`` with its output turned into logits ``(N, K)`` as declared (see :data:`OUTPUTS`)."""

    def __init__(self, module: nn.Module, *, output: str = "logits", key: str | int | None = None) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ConfigError(f"output={output!r} is not one of {', '.join(OUTPUTS)}")
        self.module = module
        self.output = output
        self.key = key

    def extra_repr(self) -> str:
        return f"output={self.output!r}, key={self.key!r}"

    def _select(self, out: Any) -> Any:
        if isinstance(self.key, int):
            return out[self.key]
        if isinstance(self.key, str):
            return out[self.key] if isinstance(out, Mapping) else getattr(out, self.key)
        if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
            return out.logits
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._select(self.module(x))
        if not isinstance(out, torch.Tensor):
            raise InputError(f"the model returned {type(out).__name__}, not a tensor; declare where its logits are "
                             "with key= (a dict key, an attribute name or a tuple index)")
        if self.output == "binary-logit":
            z = out.reshape(out.shape[0], 1)
            return torch.cat([torch.zeros_like(z), z], dim=1)
        if out.dim() != 2:
            raise InputError(f"the model's output has shape {tuple(out.shape)}; expected (N, classes)")
        return out.clamp_min(1e-12).log() if self.output == "probabilities" else out


class UserClassifier(Classifier):
    """A user's network behind its declared output adapter and optional normalisation."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: OutputAdapter, *, num_classes: int, input_shape: tuple[int, int, int] | None,
                 bounds: tuple[float, float], mean: Sequence[float] | None, std: Sequence[float] | None,
                 random: bool, arch: str) -> None:
        super().__init__(num_classes=num_classes, input_shape=input_shape, bounds=bounds, arch=arch, random=random)
        self.net = net
        self.normalize = mean is not None
        if mean is not None:
            if std is None or len(std) != len(mean) or any(s <= 0 for s in std):
                raise ConfigError(f"std={std!r} must give one positive value per channel of mean={list(mean)!r}")
            self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.net(x)


def wrap(module: nn.Module, *, input_shape: Sequence[int], num_classes: int | None = None,
         output: str = "logits", key: str | int | None = None, mean: Sequence[float] | None = None,
         std: Sequence[float] | None = None, bounds: tuple[float, float] = (0.0, 1.0),
         random: bool = False) -> UserClassifier:
    """``module`` as a classifier on inputs in ``bounds`` (see the module docstring). The number
    of classes is read from one forward pass on a zero input when not given."""
    if not isinstance(module, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(module).__name__}")
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape={tuple(input_shape)!r} must be (C, H, W)")
    adapter = OutputAdapter(module, output=output, key=key)
    if num_classes is None:
        num_classes = _probe_classes(adapter, shape, bounds)
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r}: a classifier needs at least 2 classes")
    name = type(module).__name__
    return UserClassifier(adapter, num_classes=num_classes, input_shape=(shape[0], shape[1], shape[2]),
                          bounds=bounds, mean=mean, std=std, random=random, arch=name)


@torch.no_grad()
def _probe_classes(adapter: OutputAdapter, shape: tuple[int, ...], bounds: tuple[float, float]) -> int:
    was = adapter.training
    adapter.eval()
    try:
        p = next(iter(adapter.parameters()), None)
        x = torch.full((1, *shape), float(bounds[0]), device=p.device if p is not None else "cpu")
        try:
            out = adapter(x)
        except RuntimeError as e:  # e.g. a linear layer sized for other images
            raise InputError(f"the model fails on inputs of shape (N, {', '.join(map(str, shape))}) "
                             f"(input_shape={shape!r}): {str(e).splitlines()[0]}") from None
        return int(out.shape[1])
    finally:
        adapter.train(was)


#: what a model source may look like (:func:`load_module`)
SOURCE_FORMS = "FILE.py:FACTORY, package.module:FACTORY, torchscript:PATH, timm:NAME or hf:DIR"


def load_module(source: str, **kwargs: Any) -> nn.Module:
    """The network named by ``source``: ``path/to/file.py:factory`` or ``package.module:factory``
    (called with ``kwargs``), ``torchscript:path/to/archive.pt``, ``timm:NAME`` or ``hf:DIR``
    (:mod:`bastion.models.hub`; ``kwargs`` go to timm's ``create_model`` or to ``from_pretrained``)."""
    if source.startswith("torchscript:"):
        path = Path(source.removeprefix("torchscript:"))
        if not path.is_file():
            raise ConfigError(f"model={source!r}: no TorchScript archive at {str(path)!r}")
        return torch.jit.load(str(path), map_location="cpu")
    if source.startswith(hub.TIMM) and source.removeprefix(hub.TIMM):
        return hub.load_timm(source.removeprefix(hub.TIMM), **kwargs)
    if source.startswith(hub.HF) and source.removeprefix(hub.HF):
        return hub.load_hf(source.removeprefix(hub.HF), **kwargs)
    where, sep, name = source.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"model={source!r} must be {SOURCE_FORMS}")
    factory = getattr(_import(where, source), name, None)
    if not callable(factory):
        raise ConfigError(f"model={source!r}: {where!r} has no callable {name!r}")
    module = factory(**kwargs)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model={source!r}: {name}() returned {type(module).__name__}, not a torch.nn.Module")
    return module


def declared_normalization(source: str, module: nn.Module) -> tuple[list[float], list[float]] | None:
    """The ``(mean, std)`` that ``source`` itself declares for ``module`` loaded from it (a timm
    model's ``pretrained_cfg``, a Hugging Face image processor's ``image_mean``/``image_std``), or
    None: pass it to :func:`wrap` when the user gives no ``mean``/``std``."""
    return hub.normalization(source, module)


def source_files(source: str) -> list[Path]:
    """The local files whose content determines the network of ``source`` (for cache keys): the
    factory's ``.py`` file, the TorchScript archive, every file of an ``hf:`` directory; none for
    ``package.module:FACTORY``, ``timm:NAME`` or a Hub id."""
    if source.startswith("torchscript:"):
        return [Path(source.removeprefix("torchscript:"))]
    if source.startswith((hub.TIMM, hub.HF)):
        return list(hub.source_files(source))
    where = source.rpartition(":")[0]
    return [Path(where)] if where.endswith(".py") else []


def _import(where: str, source: str) -> Any:
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"model={source!r}: no file {where!r}")
        spec = importlib.util.spec_from_file_location(f"bastion_user_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"model={source!r}: cannot import {where!r}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"model={source!r}: cannot import {where!r} ({e})") from None


def load_weights_file(module: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``module``: safetensors, or a PyTorch state dict (``.pt``/``.pth``)
    read with ``weights_only=True``; a file that needs a full unpickle is refused."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"weights={str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError (and others) for non-tensor payloads
            raise ConfigError(f"weights={str(p)!r} is not a plain state dict loadable with weights_only=True "
                              f"(Bastion never unpickles arbitrary objects): {type(e).__name__}") from None
    if not isinstance(state, Mapping):
        raise ConfigError(f"weights={str(p)!r} holds a {type(state).__name__}, not a state dict")
    misfit = _misfit(module.state_dict(), state)
    if misfit:
        raise ConfigError(f"weights={str(p)!r} do not fit the model: {misfit}")
    try:
        module.load_state_dict(dict(state))
    except RuntimeError as e:
        raise ConfigError(f"weights={str(p)!r} do not fit the model: {str(e).splitlines()[0]}") from None
    return module


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _misfit(own: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """The first difference between the model's state dict ``own`` and the file's ``state``, in
    the model's order: a key with another shape or missing from the file, then a key the model
    lacks ("" when they fit)."""
    for k, v in own.items():
        if k not in state:
            return f"the file has no {k!r} (the model's is {_shape(v)})"
        if _shape(state[k]) != _shape(v):
            return f"{k!r} has shape {_shape(state[k])} in the file but {_shape(v)} in the model"
    extra = [k for k in state if k not in own]
    return f"the model has no {extra[0]!r} (shape {_shape(state[extra[0]])} in the file)" if extra else ""

__all__ = ["OUTPUTS", "SOURCE_FORMS", "OutputAdapter", "UserClassifier", "declared_normalization", "load_module",
           "load_weights_file", "source_files", "wrap"]
