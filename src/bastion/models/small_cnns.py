"""Small fixed-size CNNs: seed 003's MNIST and CIFAR-10 models, Madry et al.'s and Wong et al.'s
MNIST models.

* ``mnist-cnn``: seed 003, Table 2 (a Keras-style MNIST CNN).
* ``cifar-cnn``: seed 003, Table 3 (a Keras-style CIFAR-10 CNN).
* ``madry-mnist``: the MNIST network of Madry, Makelov, Schmidt, Tsipras and Vladu,
  "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
* ``wong-mnist``: the MNIST network of Wong, Rice and Kolter, "Fast is better than free:
  Revisiting adversarial training", ICLR 2020 (their fast-AT MNIST experiments).

Seed 003 built its models in Keras, whose ``Conv2D`` default is ``padding="valid"``; the
tables give no padding, so both seed-003 models use no padding. All four models end in a
flatten + linear layer sized for ``input_size`` (measured with a dummy forward at
construction), so they are registered with ``fixed_size=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from bastion.models.defaults import CIFAR10, MNIST
from bastion.models.lenet import flatten_size
from bastion.models.registry import register

_MNIST = {**MNIST, "fixed_size": True}
_CIFAR = {**CIFAR10, "fixed_size": True}


class MnistCNN(nn.Module):
    """Seed 003's MNIST CNN (Table 2); ReLU activations, no padding.

    Layers (input ``(N, C, H, W)``; sizes for 28x28 in brackets):
    ``conv1`` 32@5x5 + ReLU ``(N, 32, 24, 24)``; ``conv2`` 64@5x5 + ReLU ``(N, 64, 20, 20)``;
    max-pool 2 ``(N, 64, 10, 10)``; dropout 0.25; flatten ``(N, 6400)``; ``fc1`` 128 + ReLU;
    dropout 0.5; ``fc2`` ``num_classes`` logits.

    Attributes:
        first_layer: ``conv1``.
        feature_dim: 128, the width of the activations fed to ``fc2``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop1 = nn.Dropout(0.25)
        flat = flatten_size(self, self._conv_features, in_channels, input_size, arch="mnist-cnn")
        self.fc1 = nn.Linear(flat, 128)
        self.relu3 = nn.ReLU()
        self.drop2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, num_classes)
        self.feature_dim = 128

    @property
    def first_layer(self) -> nn.Conv2d:
        """The first weight layer, ``conv1`` (32 filters of 5x5)."""
        return self.conv1

    def _conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional part: ``(N, C, H, W)`` -> ``(N, 64, (H-8)//2, (W-8)//2)``."""
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.drop1(self.pool(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``(N, 128)`` fed to the output layer (after the 0.5 dropout)."""
        return self.drop2(self.relu3(self.fc1(torch.flatten(self._conv_features(x), 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for normalised inputs ``(N, C, H, W)``."""
        return self.fc2(self.features(x))


class CifarCNN(nn.Module):
    """Seed 003's CIFAR-10 CNN (Table 3); ReLU activations, no ("valid") padding.

    Layers (input ``(N, C, H, W)``; sizes for 32x32 in brackets):
    ``conv1`` 32@5x5 + ReLU ``(N, 32, 28, 28)``; ``conv2`` 32@5x5 + ReLU ``(N, 32, 24, 24)``;
    max-pool 2 ``(N, 32, 12, 12)``; dropout 0.25; ``conv3`` 64@3x3 + ReLU ``(N, 64, 10, 10)``;
    ``conv4`` 64@3x3 + ReLU ``(N, 64, 8, 8)``; max-pool 2 ``(N, 64, 4, 4)``; dropout 0.25;
    flatten ``(N, 1024)``; ``fc1`` 512 + ReLU; dropout 0.5; ``fc2`` ``num_classes`` logits.

    Padding: the table states none and Keras' default is ``"valid"``, so none is used.

    Attributes:
        first_layer: ``conv1``.
        feature_dim: 512, the width of the activations fed to ``fc2``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 32, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.drop1 = nn.Dropout(0.25)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(64, 64, kernel_size=3)
        self.relu4 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.drop2 = nn.Dropout(0.25)
        flat = flatten_size(self, self._conv_features, in_channels, input_size, arch="cifar-cnn")
        self.fc1 = nn.Linear(flat, 512)
        self.relu5 = nn.ReLU()
        self.drop3 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(512, num_classes)
        self.feature_dim = 512

    @property
    def first_layer(self) -> nn.Conv2d:
        """The first weight layer, ``conv1`` (32 filters of 5x5)."""
        return self.conv1

    def _conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional part: ``(N, C, 32, 32)`` -> ``(N, 64, 4, 4)``."""
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        x = self.drop1(self.pool1(x))
        x = self.relu4(self.conv4(self.relu3(self.conv3(x))))
        return self.drop2(self.pool2(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``(N, 512)`` fed to the output layer (after the 0.5 dropout)."""
        return self.drop3(self.relu5(self.fc1(torch.flatten(self._conv_features(x), 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for normalised inputs ``(N, C, H, W)``."""
        return self.fc2(self.features(x))


class MadryMnist(nn.Module):
    """The MNIST network of Madry et al. (ICLR 2018), used in their PGD adversarial training.

    Layers (input ``(N, C, H, W)``; sizes for 28x28 in brackets):
    ``conv1`` 32@5x5, padding 2, ReLU, max-pool 2 ``(N, 32, 14, 14)``;
    ``conv2`` 64@5x5, padding 2, ReLU, max-pool 2 ``(N, 64, 7, 7)``;
    flatten ``(N, 3136)``; ``fc1`` 1024 + ReLU; ``fc2`` ``num_classes`` logits.

    Attributes:
        first_layer: ``conv1``.
        feature_dim: 1024, the width of the activations fed to ``fc2``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        flat = flatten_size(self, self._conv_features, in_channels, input_size, arch="madry-mnist")
        self.fc1 = nn.Linear(flat, 1024)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(1024, num_classes)
        self.feature_dim = 1024

    @property
    def first_layer(self) -> nn.Conv2d:
        """The first weight layer, ``conv1`` (32 filters of 5x5)."""
        return self.conv1

    def _conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional part: ``(N, C, H, W)`` -> ``(N, 64, H//4, W//4)``."""
        x = self.pool1(self.relu1(self.conv1(x)))
        return self.pool2(self.relu2(self.conv2(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``(N, 1024)`` fed to the output layer."""
        return self.relu3(self.fc1(torch.flatten(self._conv_features(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for normalised inputs ``(N, C, H, W)``."""
        return self.fc2(self.features(x))


class WongMnist(nn.Module):
    """The MNIST network of Wong et al.'s fast adversarial training (ICLR 2020).

    Layers (input ``(N, C, H, W)``; sizes for 28x28 in brackets): ``conv1`` 16@4x4, stride 2,
    padding 1, ReLU ``(N, 16, 14, 14)``; ``conv2`` 32@4x4, stride 2, padding 1, ReLU
    ``(N, 32, 7, 7)``; flatten ``(N, 1568)``; ``fc1`` 100 + ReLU; ``fc2`` ``num_classes`` logits.

    Attributes:
        first_layer: ``conv1``.
        feature_dim: 100, the width of the activations fed to ``fc2``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=4, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, kernel_size=4, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        flat = flatten_size(self, self._conv_features, in_channels, input_size, arch="wong-mnist")
        self.fc1 = nn.Linear(flat, 100)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(100, num_classes)
        self.feature_dim = 100

    @property
    def first_layer(self) -> nn.Conv2d:
        """The first weight layer, ``conv1`` (16 filters of 4x4)."""
        return self.conv1

    def _conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional part: ``(N, C, H, W)`` -> ``(N, 32, H//4, W//4)``."""
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``(N, 100)`` fed to the output layer."""
        return self.relu3(self.fc1(torch.flatten(self._conv_features(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for normalised inputs ``(N, C, H, W)``."""
        return self.fc2(self.features(x))


@register("mnist-cnn", summary="Seed 003's MNIST CNN (Table 2): 2 conv 5x5, dense 128, dropout", **_MNIST)
def mnist_cnn(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """Build :class:`MnistCNN` (bare; :func:`bastion.models.create` adds normalisation)."""
    return MnistCNN(num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@register("cifar-cnn", summary="Seed 003's CIFAR-10 CNN (Table 3): 4 conv, dense 512, dropout", **_CIFAR)
def cifar_cnn(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """Build :class:`CifarCNN` (bare; :func:`bastion.models.create` adds normalisation)."""
    return CifarCNN(num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@register("madry-mnist", summary="Madry et al. (2018) MNIST CNN: 2 conv 5x5 + pool, fc 1024", **_MNIST)
def madry_mnist(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """Build :class:`MadryMnist` (bare; :func:`bastion.models.create` adds normalisation)."""
    return MadryMnist(num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@register("wong-mnist", summary="Wong et al. (2020) fast-AT MNIST CNN: 2 conv 4x4 stride 2, fc 100", **_MNIST)
def wong_mnist(*, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """Build :class:`WongMnist` (bare; :func:`bastion.models.create` adds normalisation)."""
    return WongMnist(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
