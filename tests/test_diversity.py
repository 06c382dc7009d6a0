"""Diversity metrics (seed 000 Table 2 / Figs 3-4, seed 001 eqs. 7-8): bastion.eval.diversity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bastion.eval.diversity import (
    disagreements,
    gradient_cosine,
    pairs,
    saliency_similarity,
)
from bastion.models.base import as_classifier


def _linear(w: torch.Tensor) -> torch.nn.Module:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return as_classifier(torch.nn.Sequential(torch.nn.Flatten(), lin))


def _toy():
    g = torch.Generator().manual_seed(0)
    w1, w2, w3 = (torch.randn(3, 4, generator=g) for _ in range(3))
    x = torch.rand(5, 1, 2, 2, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    return [w1, w2, w3], x, y


def test_saliency_similarity_of_linear_models_is_cosine_of_weight_rows():
    ws, x, y = _toy()
    out = saliency_similarity([_linear(w) for w in ws], x, y)
    assert out["pairs"].tolist() == [[0, 1], [0, 2], [1, 2]]
    for p, (i, j) in enumerate(out["pairs"].tolist()):
        for n in range(5):  # d f(x)[y] / dx = W[y], whatever x
            ref = F.cosine_similarity(ws[i][y[n]], ws[j][y[n]], dim=0)
            assert torch.allclose(out["values"][p, n], ref, atol=1e-6)
    assert out["values"].shape == (3, 5) and out["matrix"].shape == (3, 3)
    assert torch.allclose(out["matrix"].diagonal(), torch.ones(3), atol=1e-6)


def test_gradient_cosine_is_cosine_of_loss_gradients():
    ws, x, y = _toy()
    out = gradient_cosine([_linear(w) for w in ws], x, y)
    flat = x.flatten(1)
    grads = []
    for w in ws:  # d CE(Wx, y) / dx = W^T (softmax(Wx) - onehot(y))
        s = torch.softmax(flat @ w.t(), -1) - F.one_hot(y, 3).float()
        grads.append(s @ w)
    for i in range(3):
        for j in range(3):
            ref = F.cosine_similarity(grads[i], grads[j], dim=1).mean()
            assert torch.allclose(out["matrix"][i, j], ref, atol=1e-5)
    assert out["per_point"].shape == (3, 3, 5)
    assert torch.allclose(out["matrix"], out["matrix"].t(), atol=1e-6)


def test_disagreements_count_by_hand():
    ws, x, y = _toy()
    ms = [_linear(w) for w in ws]
    x_adv = (x + 0.3).clamp(0, 1)
    out = disagreements(ms, x, y, {"shifted": x_adv})
    for name, xs in (("clean", x), ("shifted", x_adv)):
        preds = [(xs.flatten(1) @ w.t()).argmax(-1) for w in ws]
        d = out[name]
        for i in range(3):
            assert d["accuracy"][i].item() == (preds[i] == y).float().mean().item()
            for j in range(3):
                assert d["disagree"][i, j].item() == int((preds[i] != preds[j]).sum())
                same_wrong = (preds[i] != y) & (preds[j] != y) & (preds[i] == preds[j])
                assert d["same_wrong"][i, j].item() == int(same_wrong.sum())
        assert int(d["n"]) == 5
    assert pairs(4).shape == (6, 2)
