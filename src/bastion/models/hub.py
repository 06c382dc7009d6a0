"""Networks from model hubs: ``timm:NAME`` and Hugging Face image classifiers (``hf:DIR``).

Both packages are optional (``pip install bastion-adv[hub]``); a missing one is a
:class:`~bastion.errors.ConfigError` that says so. Nothing is downloaded unless the user asks:

* ``timm:NAME`` builds ``timm.create_model(NAME, pretrained=False, **args)``; ``pretrained=true``
  (``--model-arg pretrained=true``) lets timm download its weights. Weights of your own load
  with ``weights=`` as for any source.
* ``hf:DIR`` loads ``transformers.AutoModelForImageClassification.from_pretrained(DIR,
  local_files_only=True)`` from a local directory (what ``save_pretrained`` writes). A Hub id
  (``hf:google/vit-base-patch16-224``) is downloaded only with ``allow_download=true``. The
  model returns an object with ``.logits``, which :class:`~bastion.models.user.OutputAdapter`
  reads.

:func:`normalization` gives the preprocessing a source declares, which Bastion applies inside
the classifier as ``mean``/``std`` when the user gives none: timm's ``pretrained_cfg``
(``mean``, ``std``), or the image processor's ``preprocessor_config.json`` (``image_mean``,
``image_std``, with its ``rescale_factor``). Bastion never resizes: inputs must already have
the size the model expects.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from bastion.errors import ConfigError

TIMM = "timm:"
HF = "hf:"
#: what the image processor of a Hugging Face model directory is saved as
PREPROCESSOR_FILE = "preprocessor_config.json"


def _require(package: str, source: str) -> Any:
    """The module ``package``, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"model={source!r} needs the package {package!r}: pip install 'bastion-adv[hub]'") from None


def _flag(kwargs: dict[str, Any], name: str, source: str) -> bool:
    value = kwargs.pop(name, False)
    if not isinstance(value, bool):
        raise ConfigError(f"model={source!r}: {name}={value!r} must be true or false")
    return value


def load_timm(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``; ``pretrained=True`` downloads."""
    source = TIMM + name
    timm = _require("timm", source)
    pretrained = _flag(kwargs, "pretrained", source)
    try:
        module = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model (NAME)"
        raise ConfigError(f"model={source!r}: {str(e).splitlines()[0]}") from None
    return module.eval()


def load_hf(where: str, **kwargs: Any) -> nn.Module:
    """A Hugging Face image classifier from the local directory ``where``; a Hub id only with
    ``allow_download=True``. Other ``kwargs`` go to ``from_pretrained``."""
    source = HF + where
    allow = _flag(kwargs, "allow_download", source)
    local = Path(where).is_dir()
    if not local and not allow:
        raise ConfigError(f"model={source!r}: {where!r} is not a local directory; a Hugging Face Hub id is "
                          "downloaded only with allow_download=true (--model-arg allow_download=true)")
    transformers = _require("transformers", source)
    try:
        module = transformers.AutoModelForImageClassification.from_pretrained(
            where, local_files_only=local or not allow, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model={source!r}: cannot load it ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return module.eval()


def _pair(mean: Any, std: Any, scale: float, where: str) -> tuple[list[float], list[float]] | None:
    if mean is None or std is None:
        return None
    m = [float(mean)] if isinstance(mean, (int, float)) else [float(v) for v in mean]
    s = [float(std)] if isinstance(std, (int, float)) else [float(v) for v in std]
    if len(m) != len(s) or any(v <= 0 for v in s):
        raise ConfigError(f"{where}: mean={m!r} and std={s!r} must give one positive std per channel")
    return [v / scale for v in m], [v / scale for v in s]


def _processor_config(where: str) -> Path | None:
    """The image processor's config of an ``hf:`` source: in the directory, or in the Hugging
    Face cache for a Hub id (if it was downloaded there)."""
    path = Path(where) / PREPROCESSOR_FILE
    if Path(where).is_dir():
        return path if path.is_file() else None
    hub = _require("huggingface_hub", HF + where)
    cached = hub.try_to_load_from_cache(where, PREPROCESSOR_FILE)
    return Path(cached) if isinstance(cached, str) else None


def hf_normalization(where: str) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` on [0, 1] inputs from the image processor of ``hf:where`` (None without one,
    or when it does not normalise). The processor computes ``(pixel * rescale_factor - image_mean)
    / image_std`` on 0..255 pixels (``pixel`` alone without rescaling), which on Bastion's inputs
    ``x = pixel / 255`` is ``(x - image_mean / s) / (image_std / s)`` with ``s = 255 *
    rescale_factor``."""
    path = _processor_config(where)
    if path is None:
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model={HF + where!r}: cannot read {str(path)!r} ({type(e).__name__})") from None
    if not isinstance(cfg, Mapping) or not cfg.get("do_normalize", True):
        return None
    scale = 255.0 * float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 255.0
    return _pair(cfg.get("image_mean"), cfg.get("image_std"), scale, str(path))


def timm_normalization(module: nn.Module) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` from a timm model's ``pretrained_cfg`` (None if it declares none)."""
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if not isinstance(cfg, Mapping):
        return None
    return _pair(cfg.get("mean"), cfg.get("std"), 1.0, f"model {type(module).__name__}'s pretrained_cfg")


def normalization(source: str, module: nn.Module) -> tuple[list[float], list[float]] | None:
    """The ``(mean, std)`` that hub source ``source`` declares for ``module`` (see the module
    docstring), or None."""
    if source.startswith(TIMM):
        return timm_normalization(module)
    if source.startswith(HF):
        return hf_normalization(source.removeprefix(HF))
    return None


def source_files(source: str) -> Sequence[Path]:
    """The local files that determine a hub source's network (for cache keys): every file of an
    ``hf:`` directory; none for timm or a Hub id (only ``weights=`` then)."""
    if source.startswith(HF) and Path(source.removeprefix(HF)).is_dir():
        base = Path(source.removeprefix(HF))
        return sorted(p for p in base.rglob("*") if p.is_file())
    return []


__all__ = ["HF", "PREPROCESSOR_FILE", "TIMM", "hf_normalization", "load_hf", "load_timm", "normalization",
           "source_files", "timm_normalization"]
