"""Hub sources (``timm:NAME``, ``hf:DIR``): offline, with models built here.

timm needs torchvision, which has no CPU build here, so its loader is checked against a fake
``timm`` module (what it calls, that nothing is downloaded unless asked) and for the error when
timm is missing. The Hugging Face path runs a real tiny ViT saved to a temporary directory, when
transformers is installed (the ``hub`` extra; CI does not need it)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bastion import attacks
from bastion.errors import ConfigError
from bastion.models import hub, user


class _TinyTimmNet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, num_classes)
        self.pretrained_cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (3, 4, 4)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture()
def fake_timm(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A ``timm`` module whose ``create_model`` records its calls (and knows one model)."""
    calls: list[dict[str, Any]] = []

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        calls.append({"name": name, "pretrained": pretrained, **kwargs})
        if name != "tiny":
            raise RuntimeError(f"Unknown model ({name})")
        return _TinyTimmNet(**kwargs).train()

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    return calls


def test_timm_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ConfigError, match=r"model='timm:resnet18' needs the package 'timm'.*bastion-adv\[hub\]"):
        user.load_module("timm:resnet18")


def test_timm_builds_without_download_unless_asked(fake_timm: list[dict[str, Any]]) -> None:
    net = user.load_module("timm:tiny", num_classes=10)
    assert fake_timm[-1] == {"name": "tiny", "pretrained": False, "num_classes": 10}
    assert not net.training, "a hub model comes back in eval mode"
    user.load_module("timm:tiny", pretrained=True)
    assert fake_timm[-1]["pretrained"] is True
    with pytest.raises(ConfigError, match="pretrained='yes' must be true or false"):
        user.load_module("timm:tiny", pretrained="yes")
    with pytest.raises(ConfigError, match=r"model='timm:nope': Unknown model \(nope\)"):
        user.load_module("timm:nope")
    mean, std = user.declared_normalization("timm:tiny", net) or ([], [])
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
    model = user.wrap(net, input_shape=(3, 4, 4), mean=mean, std=std)
    x = torch.rand(2, 3, 4, 4)
    ref = net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(model(x), ref) and model.num_classes == 10


def test_hf_hub_id_needs_allow_download_and_missing_transformers_is_clear(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not a local directory.*allow_download=true"):
        user.load_module("hf:google/vit-base-patch16-224")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"needs the package 'transformers'.*bastion-adv\[hub\]"):
        user.load_module(f"hf:{tmp_path}")


def test_hf_normalization_follows_the_image_processor(tmp_path: Path) -> None:
    assert hub.hf_normalization(str(tmp_path)) is None  # no preprocessor config: no normalisation declared
    cfg = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.25, 0.2, 0.1], "do_rescale": True, "rescale_factor": 1 / 255}
    (tmp_path / hub.PREPROCESSOR_FILE).write_text(json.dumps(cfg))
    mean, std = hub.hf_normalization(str(tmp_path)) or ([], [])
    assert mean == pytest.approx([0.5, 0.4, 0.3]) and std == pytest.approx([0.25, 0.2, 0.1])
    # a processor that does not rescale takes 0..255 pixels: on [0, 1] inputs its statistics are / 255
    (tmp_path / hub.PREPROCESSOR_FILE).write_text(json.dumps({**cfg, "do_rescale": False}))
    mean, std = hub.hf_normalization(str(tmp_path)) or ([], [])
    assert mean == pytest.approx([0.5 / 255, 0.4 / 255, 0.3 / 255]) and std == pytest.approx([0.25 / 255, 0.2 / 255,
                                                                                               0.1 / 255])
    (tmp_path / hub.PREPROCESSOR_FILE).write_text(json.dumps({**cfg, "do_normalize": False}))
    assert hub.hf_normalization(str(tmp_path)) is None
    assert user.source_files(f"hf:{tmp_path}") == [tmp_path / hub.PREPROCESSOR_FILE]


def _tiny_vit(where: Path) -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="the Hugging Face path needs the [hub] extra")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=10)
    net = transformers.ViTForImageClassification(cfg).eval()
    net.save_pretrained(where)
    (where / hub.PREPROCESSOR_FILE).write_text(json.dumps({"image_mean": [0.5], "image_std": [0.5],
                                                           "rescale_factor": 1 / 255}))
    return net


def test_hf_vit_from_a_local_directory_is_attacked_through_wrap(tmp_path: Path) -> None:
    """A tiny ViT saved with save_pretrained, loaded with ``hf:DIR`` (local files only), its
    ``.logits`` read by the output adapter and its processor's normalisation applied inside."""
    ref = _tiny_vit(tmp_path / "vit")
    net = user.load_module(f"hf:{tmp_path / 'vit'}")
    declared = user.declared_normalization(f"hf:{tmp_path / 'vit'}", net)
    assert declared == ([0.5], [0.5])
    model = user.wrap(net, input_shape=(1, 28, 28), mean=declared[0], std=declared[1])
    torch.manual_seed(1)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    with torch.no_grad():
        assert torch.allclose(model(x), ref((x - 0.5) / 0.5).logits, atol=1e-5)
    res = attacks.create("pgd", eps=0.1, steps=5, alpha=0.05)(model, x, y)
    assert res.x_adv.shape == x.shape and float((res.x_adv - x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        wrong = model(res.x_adv).argmax(1) != y
    assert torch.equal(res.success, wrong), "success is what the model says at x_adv"
    assert wrong.float().mean() >= (model(x).argmax(1) != y).float().mean()
