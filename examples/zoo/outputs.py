"""The plain network (``plain.py``) returning its logits in the shapes other libraries use.

``form`` picks what :func:`build`'s model returns:

* ``"dict"``: ``{"logits": ..., "features": ...}`` -- declare ``key="logits"``;
* ``"tuple"``: ``(logits, features)`` -- declare ``key=0``;
* ``"object"``: an object with a ``.logits`` attribute, as Hugging Face models return -- read
  through it without declaring anything;
* ``"binary"``: one logit of class 1 (a sigmoid classifier, ``classes=1``) -- declare
  ``output="binary-logit"``; Bastion uses the two logits ``[0, z]``.
"""

from dataclasses import dataclass

import torch
from torch import nn

FORMS = ("dict", "tuple", "object", "binary")


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    features: torch.Tensor


class Returns(nn.Module):
    def __init__(self, form: str = "dict", classes: int = 10) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form={form!r} is not one of {FORMS}")
        self.form = form
        # the same network as plain.py (its state dict loads here when classes match)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, classes))

    def extra_repr(self) -> str:
        return f"form={self.form!r}"

    def forward(self, x: torch.Tensor) -> object:
        features = self.net[:3](x)
        logits = self.net[3](features)
        if self.form == "dict":
            return {"logits": logits, "features": features}
        if self.form == "tuple":
            return logits, features
        if self.form == "object":
            return ClassifierOutput(logits=logits, features=features)
        return logits.squeeze(1)  # binary: (N,) logits of class 1


def build(form: str = "dict", classes: int = 10) -> nn.Module:
    return Returns(form, 1 if form == "binary" else classes)
