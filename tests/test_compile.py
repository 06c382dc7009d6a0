"""Opt-in compilation (bastion.models.compiled): in place, the same state-dict keys, the same
gradients to the input and the weights as eager PyTorch up to float order, a training that
checkpoints and resumes, and settings that stay out of the hashes when off."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion import attacks
from bastion.data.base import ImageDataset
from bastion.errors import ConfigError
from bastion.harness.cache import all_keys
from bastion.harness.config import config_hash, load_harness_config
from bastion.models import compile_model, is_compiled, speed_up
from bastion.models.base import NormalizedClassifier
from bastion.train.checkpoint import load_weights
from bastion.train.config import TrainConfig
from bastion.train.trainer import train


def small(seed: int = 0) -> NormalizedClassifier:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net = NormalizedClassifier(body, mean=[0.5], std=[0.5], num_classes=3)
    return net


#: torch.compile's CPU backend generates C++ and needs a compiler
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on CPU needs a C++ compiler")


@needs_compiler
def test_a_compiled_model_is_the_same_module_with_the_same_gradients(tmp_path: Path) -> None:
    eager, compiled = small(), small()
    keys = list(compiled.state_dict())
    assert compile_model(compiled) is compiled and is_compiled(compiled) and not is_compiled(eager)
    assert list(compiled.state_dict()) == keys
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    for bs in (12, 5):  # a second batch size: the working set of an early-stopping attack shrinks
        grads = []
        for m in (eager, compiled):
            xg = x[:bs].clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(F.cross_entropy(m(xg), y[:bs], reduction="sum"), xg)
            grads.append(gx)
        assert torch.allclose(grads[0], grads[1], atol=1e-6)
    # an attack through the engine: the budget holds and the outcome is eager's on this model
    pgd = attacks.create("pgd", eps=0.2, steps=3)
    a = pgd(eager, x, y, generator=torch.Generator().manual_seed(0))
    b = pgd(compiled, x, y, generator=torch.Generator().manual_seed(0))
    assert float((b.x_adv - x).abs().max()) <= 0.2 + 1e-6
    assert torch.equal(a.success, b.success)
    # a compiled training checkpoints the plain module, which loads uncompiled
    ds = ImageDataset(name="tiny", split="train", x=x, y=y, classes=("a", "b", "c"), mean=(0.5,), std=(0.5,))
    cfg = TrainConfig(epochs=1, batch_size=6, lr=0.05, device="cpu", compile=True)
    res = train(small(), ds, cfg, out_dir=tmp_path / "run", progress=False)
    assert is_compiled(res.model)
    loaded = small(seed=5)
    load_weights(tmp_path / "run" / "final", loaded)  # the plain module's keys
    assert not is_compiled(loaded)
    ref = train(small(), ds, TrainConfig(epochs=1, batch_size=6, lr=0.05, device="cpu"), progress=False)
    for p, q in zip(loaded.parameters(), ref.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_channels_last_weights_give_the_same_logits_and_gradients() -> None:
    eager, cl = small(), speed_up(small(), channels_last=True)
    conv = next(m for m in cl.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(9, 1, 8, 8, requires_grad=True)
    (ge,) = torch.autograd.grad(eager(x).logsumexp(1).sum(), x)
    (gc,) = torch.autograd.grad(cl(x).logsumexp(1).sum(), x)
    assert torch.allclose(eager(x), cl(x), atol=1e-6) and torch.allclose(ge, gc, atol=1e-6)


def test_speed_settings_stay_out_of_the_hashes_when_off() -> None:
    cfg = load_harness_config(None)
    for name in ("compile", "channels_last"):
        on = load_harness_config(None, {f"evaluation.{name}": True})
        assert config_hash(cfg) != config_hash(on)
        # like the device: a model trained with them is the same model for the cache
        assert all_keys(load_harness_config(None, {f"training.{name}": True})) == all_keys(cfg)
    with pytest.raises(ConfigError, match="evaluation.channels_last=1"):
        load_harness_config(None, {"evaluation.channels_last": 1})
    with pytest.raises(ConfigError, match="evaluation.compile='yes'"):
        load_harness_config(None, {"evaluation.compile": "yes"})
    with pytest.raises(ConfigError, match="channels_last=1"):
        compile_model(small(), channels_last=1)  # type: ignore[arg-type]
