"""Tests of the model zoo: every registered architecture builds, runs, trains and seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion import models
from bastion.errors import ConfigError, UnknownNameError
from bastion.models import Classifier, create, init_weights
from bastion.models.init import INITS

NAMES = models.list()
EXPECTED = {
    "lenet5",
    "mnist-cnn",
    "cifar-cnn",
    "madry-mnist",
    "wong-mnist",
    "resnet18",
    "resnet32",
    "resnet50",
    "vgg13",
    "vgg16",
    "mobilenetv3-small",
}


def _default_shape(name: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the entry's default input."""
    d = models.MODELS.get(name).defaults
    size = d.get("input_size", 32)
    return (d.get("in_channels", 3), size, size)


def _batch(name: str, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *_default_shape(name), generator=g)


def _weight_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_registry_holds_every_architecture() -> None:
    assert set(NAMES) >= EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_forward_default(name: str) -> None:
    model = create(name)
    assert isinstance(model, Classifier) and model.arch == name
    model.eval()
    x = _batch(name)
    model.check_inputs(x)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_and_backward(name: str) -> None:
    model = create(name, num_classes=7)
    model.train()
    logits = model(_batch(name))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", NAMES)
def test_first_layer_is_first_conv(name: str) -> None:
    net = create(name).net
    first = net.first_layer  # type: ignore[attr-defined]
    assert isinstance(first, nn.Conv2d)
    assert first is next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == _default_shape(name)[0]
    # it is also the first weight layer the input goes through
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in _weight_layers(net)]
    net.eval()
    with torch.no_grad():
        net(_batch(name))
    for h in hooks:
        h.remove()
    assert order[0] is first


@pytest.mark.parametrize("name", NAMES)
def test_seeded_construction_is_deterministic(name: str) -> None:
    a = create(name, seed=0).state_dict()
    torch.rand(3)  # move the global RNG on: the seed alone must fix the weights
    b = create(name, seed=0).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = create(name, seed=1).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_registry_defaults(name: str) -> None:
    d = models.MODELS.get(name).defaults
    model = create(name)
    c = _default_shape(name)[0]
    assert model.in_channels == c
    assert isinstance(d.get("fixed_size"), bool)
    if d["fixed_size"]:
        assert model.input_shape == _default_shape(name)
    else:
        assert model.input_shape is None
    expected_init = "xavier-normal" if name in {"resnet18", "vgg13", "vgg16"} else None
    assert d.get("init") == expected_init


@pytest.mark.parametrize("scheme", list(INITS))
def test_every_init_scheme(scheme: str) -> None:
    torch.manual_seed(0)
    base = create("lenet5")
    torch.manual_seed(0)
    model = create("lenet5", init=scheme)
    for (n, p0), p1 in zip(base.named_parameters(), model.parameters(), strict=True):
        if n.endswith("weight"):
            assert not torch.equal(p0, p1), f"{scheme} left {n} unchanged"
        else:
            assert torch.count_nonzero(p1) == 0, f"{scheme} did not zero {n}"
    logits = model(_batch("lenet5"))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("scheme", list(INITS))
@pytest.mark.parametrize("name", ["mobilenetv3-small", "resnet32", "madry-mnist"])
def test_init_schemes_on_other_layer_kinds(scheme: str, name: str) -> None:
    # depthwise and SE convs (mobilenet), bias-free convs with BN (resnet), big linear layers
    model = create(name, init=scheme, seed=0)
    model.train()
    logits = model(_batch(name))
    assert torch.isfinite(logits).all()
    for m in _weight_layers(model):
        assert torch.isfinite(m.weight).all() and m.weight.std() > 0
        if m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0


def test_init_weights_on_a_bare_net() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    before = [m.weight.detach().clone() for m in _weight_layers(net)]
    init_weights(net, "orthogonal")
    after = [m.weight for m in _weight_layers(net)]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    with pytest.raises(ConfigError, match="init"):
        init_weights(net, "he-magic")
    with pytest.raises(ConfigError, match="init"):
        create("lenet5", init="he-magic")


def test_xavier_default_is_applied() -> None:
    # xavier-normal gives the stem conv of resnet18 std sqrt(2 / (fan_in + fan_out)).
    w = create("resnet18", seed=0).net.first_layer.weight.detach()  # type: ignore[attr-defined]
    fan_in, fan_out = 3 * 9, 64 * 9
    expected = (2.0 / (fan_in + fan_out)) ** 0.5
    assert abs(float(w.std()) - expected) / expected < 0.1
    # PyTorch's default (kaiming-uniform with a=sqrt(5)) has std 1/sqrt(3 fan_in) ~ 0.111
    w2 = create("resnet18", seed=0, init="kaiming-normal").net.first_layer.weight.detach()  # type: ignore[attr-defined]
    assert abs(float(w2.std()) - (2.0 / fan_in) ** 0.5) / (2.0 / fan_in) ** 0.5 < 0.1


@pytest.mark.parametrize("k, spans, extra", [(4, ((0, 1), (2, 3), (4, 5), (6, 7)), 3), (6, ((0, 2), (3, 5)), 2)])
def test_resnet18_extra_skip(k: int, spans: tuple[tuple[int, int], ...], extra: int) -> None:
    plain = create("resnet18", seed=0)
    model = create("resnet18", seed=0, extra_skip=k)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_skip = sum(p.numel() for p in model.parameters())
    assert n_skip > n_plain
    assert model.net.extra_skip_spans == spans  # type: ignore[attr-defined]
    projections = [m for m in model.net.extra_skips if not isinstance(m, nn.Identity)]  # type: ignore[attr-defined]
    assert len(projections) == extra
    model.train()
    logits = model(_batch("resnet18"))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(_batch("resnet18"))).all()


@pytest.mark.parametrize("bad", [3, 5, 8, 0, -4, "4", 4.0, True])
def test_resnet18_bad_extra_skip(bad: object) -> None:
    with pytest.raises(ConfigError, match="extra_skip"):
        create("resnet18", extra_skip=bad)


def test_unknown_model_name() -> None:
    with pytest.raises(UnknownNameError, match="resnet19"):
        create("resnet19")
    assert issubclass(UnknownNameError, ConfigError)


def test_mobilenet_cifar_stem_option() -> None:
    x = _batch("mobilenetv3-small")
    for cifar_stem in (True, False):
        model = create("mobilenetv3-small", cifar_stem=cifar_stem)
        assert model.net.first_layer.stride == ((1, 1) if cifar_stem else (2, 2))  # type: ignore[attr-defined]
        model.train()
        model(x).sum().backward()
    with pytest.raises(ConfigError, match="cifar_stem"):
        create("mobilenetv3-small", cifar_stem="yes")


def test_fixed_size_models_accept_other_sizes_and_reject_tiny_ones() -> None:
    model = create("lenet5", input_size=32)
    assert model.input_shape == (1, 32, 32)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    model = create("cifar-cnn", in_channels=1, input_size=(28, 36))
    assert model(torch.rand(2, 1, 28, 36)).shape == (2, 10)
    with pytest.raises(ConfigError, match="input_size"):
        create("lenet5", input_size=8)
    with pytest.raises(ConfigError, match="input_size"):
        create("vgg16", input_size=16)


def test_adaptive_models_accept_other_sizes() -> None:
    for name in ("resnet32", "mobilenetv3-small", "vgg13"):
        model = create(name).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 3, 40, 48)).shape == (2, 10)


@pytest.mark.parametrize("name", ["lenet5", "resnet32"])
def test_features_feed_the_head(name: str) -> None:
    net = create(name).net.eval()
    x = _batch(name)
    with torch.no_grad():
        f = net.features(x)  # type: ignore[attr-defined]
        assert f.shape == (2, net.feature_dim)  # type: ignore[attr-defined]
        head = net.fc2 if name == "lenet5" else net.fc  # type: ignore[attr-defined]
        assert torch.allclose(net(x), head(f))


def test_wong_mnist_is_their_network() -> None:
    """Wong et al.'s fast-AT MNIST network: 16 and 32 filters of 4x4 at stride 2, fc 100
    (166,406 weights), on 28x28 and on the 8x8 digits."""
    net = create("wong-mnist", seed=0)
    assert sum(p.numel() for p in net.parameters()) == 16 * 16 + 16 + 32 * 16 * 16 + 32 + 1568 * 100 + 100 + 1010
    assert create("wong-mnist", seed=0, input_size=8)(torch.rand(3, 1, 8, 8)).shape == (3, 10)
