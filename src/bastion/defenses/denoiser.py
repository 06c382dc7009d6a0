"""Stacked denoising autoencoders put in front of the classifier, with input noise.

Seed 004, sections 2.2.2 and 3.3.2: a convolutional autoencoder is trained separately on
images with added Gaussian noise and placed as a first layer of the network. Since the
autoencoder alone did not remove the attack, Gaussian noise is added to the image *before* it
goes through the autoencoder (at training and at test time), and the noise + autoencoder stage
can be repeated: Table 1 (CIFAR-10, FGSM) reports 1 stage without noise 70.10% clean / 9.66%
FGSM, 1 stage with noise 71.38 / 35.44, 2 stages 68.26 / 44.9, 3 stages 67.28 / 49.0 and
4 stages 65.72 / 53.32.

Implementation (Bastion choices where the seed is silent, all documented):

* each stage is ``x -> AE(x + noise_std * N(0, I))``; the autoencoder is two 3x3 conv + ReLU +
  2x2 max-pool blocks down (``width``, ``width // 2`` channels), two stride-2 transposed
  convolutions up and a 3x3 conv with a sigmoid out, so it maps ``[0, 1]`` images to ``[0, 1]``
  images for any channel count and any ``H, W`` divisible by 4;
* the seed's noise is "gaussian noise (with a 0.1 mean)": read as zero-mean noise of standard
  deviation 0.1 (a constant shift is not noise to remove);
* stage ``s`` is trained (MSE, Adam) to map the noisy output of stages ``1..s-1`` on a clean
  training image back to that clean image;
* the noise is kept at evaluation time, so the defended model is random: the front-end builder
  sets ``model.stochastic = True`` when ``noise_std > 0`` (evaluators then use EOT);
* the autoencoders are frozen while the classifier is then trained with clean cross-entropy
  through them ("trained separately" in the seed; ``freeze=False`` fine-tunes them too);
* the front end is recorded in the model's spec (``{"name": "denoiser", stack, noise_std,
  width}``), so :func:`bastion.train.checkpoint.load_model` rebuilds it and loads its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.data.base import ImageDataset
from bastion.defenses.base import Defense, require_normalized
from bastion.defenses.registry import register
from bastion.errors import ConfigError
from bastion.models.base import Classifier, NormalizedClassifier
from bastion.models.components import FRONT_ENDS
from bastion.utils.progress import bar as progress_bar

MAX_STACK = 4  # seed 004 Table 1 goes up to four noise + autoencoder stages


class DenoisingAutoencoder(nn.Module):
    """Convolutional autoencoder ``[0, 1]^(C, H, W) -> [0, 1]^(C, H, W)`` (``H, W`` divisible by 4)."""

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        half = max(width // 2, 1)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, half, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(half, half, 2, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(half, width, 2, stride=2), nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ConfigError(f"the denoiser needs H and W divisible by 4, got input shape {tuple(x.shape)}")
        return self.decoder(self.encoder(x))


class DenoiseStage(nn.Module):
    """One stage: add Gaussian noise (train and eval), then denoise."""

    def __init__(self, channels: int, width: int, noise_std: float) -> None:
        super().__init__()
        self.noise_std = float(noise_std)
        self.ae = DenoisingAutoencoder(channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return self.ae(x)

    def extra_repr(self) -> str:
        return f"noise_std={self.noise_std}"


class DenoiserStack(nn.Module):
    """``stack`` noise + autoencoder stages applied in turn (seed 004 Table 1: 1 to 4)."""

    def __init__(self, channels: int, *, stack: int = 1, noise_std: float = 0.1, width: int = 32) -> None:
        super().__init__()
        _check_front_end_params(stack, noise_std, width)
        self.stages = nn.ModuleList(DenoiseStage(channels, width, noise_std) for _ in range(stack))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def _check_front_end_params(stack: Any, noise_std: Any, width: Any) -> None:
    if isinstance(stack, bool) or not isinstance(stack, int) or not 1 <= stack <= MAX_STACK:
        raise ConfigError(f"stack={stack!r} must be an integer in 1..{MAX_STACK}")
    number = isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool)
    if not number or not math.isfinite(noise_std) or noise_std < 0:
        raise ConfigError(f"noise_std={noise_std!r} must be a finite number >= 0")
    if isinstance(width, bool) or not isinstance(width, int) or width < 2:
        raise ConfigError(f"width={width!r} must be an integer >= 2")


@FRONT_ENDS.register("denoiser", summary="Gaussian noise + denoising autoencoder stages (seed 004)")
def build_denoiser(params: dict[str, Any], model: NormalizedClassifier) -> DenoiserStack:
    """Front-end builder: a fresh :class:`DenoiserStack` for ``model``'s channels from
    ``params`` (``stack``, ``noise_std``, ``width``); marks ``model`` stochastic when the
    stack adds noise."""
    params = dict(params)
    known = {"stack", "noise_std", "width"}
    for k in params:
        if k not in known:
            raise ConfigError(f"front end 'denoiser' has no parameter {k!r}; parameters: {', '.join(sorted(known))}")
    stack = DenoiserStack(
        model.in_channels,
        stack=params.get("stack", 1),
        noise_std=params.get("noise_std", 0.1),
        width=params.get("width", 32),
    ).to(model.mean.device)
    model.stochastic = bool(model.stochastic or float(params.get("noise_std", 0.1)) > 0)
    return stack


@register("denoiser", summary="Front end of 1-4 (Gaussian noise + denoising autoencoder) stages, "
                              "classifier trained with CE (seed 004)")
@dataclass(frozen=True)
class Denoiser(Defense):
    """Train a stack of denoising autoencoders on noisy training images, put it before the
    classifier (:meth:`prepare`), then train the classifier with clean cross-entropy.

    Fields:
        stack: number of noise + autoencoder stages, 1..4 (seed Table 1; 4 has the best FGSM
            accuracy there).
        noise_std: standard deviation of the Gaussian noise added before each autoencoder, in
            training and at test time (seed: 0.1); 0 gives the seed's "no noise" row.
        width: channels of the autoencoder's first convolution (Bastion choice: 32).
        ae_epochs, ae_lr, ae_batch_size: training of each autoencoder (Adam, MSE); the seed
            gives none (Bastion choices).
        freeze: keep the autoencoders fixed while the classifier trains.
        seed: seed of the autoencoders' initialisation, shuffling and training noise.
    """

    name: str = "denoiser"
    stack: int = 4  # seed 004 Table 1: four layers with noise, best FGSM accuracy (53.32%)
    noise_std: float = 0.1  # seed 004 section 3.3.2: Gaussian noise "with a 0.1 mean" (read as sigma)
    width: int = 32  # Bastion choice (the seed does not describe the autoencoder)
    ae_epochs: int = 2  # Bastion choice
    ae_lr: float = 1e-3  # Bastion choice (Adam)
    ae_batch_size: int = 128  # Bastion choice
    freeze: bool = True  # seed 004: the autoencoder is trained separately, then added
    seed: int = 0

    def __post_init__(self) -> None:
        _check_front_end_params(self.stack, self.noise_std, self.width)
        for f in ("ae_epochs", "ae_batch_size"):
            v = getattr(self, f)
            lo = 0 if f == "ae_epochs" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{f}={v!r} must be an integer >= {lo}")
        lr = self.ae_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"ae_lr={lr!r} must be a finite number > 0")
        if not isinstance(self.freeze, bool):
            raise ConfigError(f"freeze={self.freeze!r} must be true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer")

    def front_end_params(self) -> dict[str, Any]:
        """The front end's spec entries (what a checkpoint needs to rebuild it)."""
        return {"stack": self.stack, "noise_std": float(self.noise_std), "width": self.width}

    def prepare(self, model: Classifier, train_set: ImageDataset, *, progress: bool = False) -> NormalizedClassifier:
        """Build the stack, train each autoencoder on ``train_set``'s images (with a bar of its
        batches when ``progress``) and attach the stack as ``model``'s front end (recorded in
        ``model.spec``)."""
        clf = require_normalized(model, self.name)
        if clf.front_end is not None:
            have = type(clf.front_end).__name__
            raise ConfigError(f"model already has a front end ({have}); the denoiser needs a bare model")
        _, h, w = train_set.shape
        if h % 4 or w % 4:
            raise ConfigError(f"the denoiser needs image sides divisible by 4, got {h}x{w}")
        params = self.front_end_params()
        torch.manual_seed(self.seed)
        front: DenoiserStack = FRONT_ENDS.get("denoiser").factory(params, clf)  # type: ignore[assignment]
        self.train_stack(front, train_set.x, progress=progress)
        if self.freeze:
            front.requires_grad_(False)
        clf.front_end = front
        clf.spec = {**clf.spec, "front_end": {"name": "denoiser", **params}}
        return clf

    def train_stack(self, front: DenoiserStack, images: torch.Tensor, *, progress: bool = False) -> list[float]:
        """Train the stages in turn; returns each stage's last-epoch mean MSE."""
        device = next(front.parameters()).device
        gen = torch.Generator().manual_seed(self.seed)
        n = images.shape[0]
        losses: list[float] = []
        per_epoch = -(-n // self.ae_batch_size)
        with progress_bar(total=len(front.stages) * self.ae_epochs * per_epoch, progress=progress,
                          desc="denoising autoencoders", unit="batch", leave=False) as bar:
            for s, stage_ in enumerate(front.stages):
                stage: DenoiseStage = stage_  # type: ignore[assignment]
                opt = torch.optim.Adam(stage.ae.parameters(), lr=self.ae_lr)
                stage.train()
                last = float("nan")
                for _ in range(self.ae_epochs):
                    perm = torch.randperm(n, generator=gen)
                    total = 0.0
                    for b in range(0, n, self.ae_batch_size):
                        clean = images[perm[b : b + self.ae_batch_size]]
                        noise = self.noise_std * torch.randn(clean.shape, generator=gen)
                        clean, noise = clean.to(device), noise.to(device)
                        with torch.no_grad():
                            inp = clean
                            for prev in list(front.stages)[:s]:  # earlier (already trained) stages
                                inp = prev(inp)
                        loss = F.mse_loss(stage.ae(inp + noise), clean)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        total += float(loss.detach()) * clean.shape[0]
                        bar.update(1)
                    last = total / n
                    bar.set_postfix(stage=s + 1, mse=f"{last:.4f}")
                losses.append(last)
        self.context["ae_losses"] = losses
        return losses


__all__ = ["DenoiseStage", "Denoiser", "DenoiserStack", "DenoisingAutoencoder", "build_denoiser"]
