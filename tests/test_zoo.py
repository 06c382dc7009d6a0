"""The zoo of masked models (``examples/zoo/``): what an audit says about each.

One plain network is trained once on real MNIST and saved with ``torch.save(state_dict())``;
every zoo model is built from its file's factory and loads those weights, as a user would
(``load_module`` + ``load_weights_file``). Each audit writes its own database (the audits here
share weights and data, and so their fingerprints).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bastion import attacks, data
from bastion.data.base import ImageDataset
from bastion.eval.sanity import EXPLANATIONS
from bastion.eval.settings import ADAPTIVE, EvaluationSection
from bastion.harness.audit import AuditResult, audit
from bastion.models.user import load_module, load_weights_file, wrap
from bastion.results.worst_case import WORST_CASE_LABEL

ZOO = Path(__file__).resolve().parents[1] / "examples" / "zoo"
SHAPE = (1, 28, 28)
pytestmark = pytest.mark.needs_data("mnist")


def _settings(**kw: Any) -> EvaluationSection:
    return EvaluationSection(**{"protocols": [ADAPTIVE], "batch_size": 200, "queries": 5, "autoattack": False,
                                "sanity": False, **kw})


def _train(net: nn.Module, train: ImageDataset, epochs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(train), 100):
            loss = nn.functional.cross_entropy(net(train.x[i:i + 100]), train.y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def train_set() -> ImageDataset:
    return data.load("mnist", "train").take(5000)


@pytest.fixture(scope="module")
def points() -> ImageDataset:
    return data.load("mnist", "test").take(200)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory, train_set: ImageDataset) -> Path:
    """The plain network (``examples/zoo/plain.py``) trained on 5,000 MNIST points, saved as a
    user saves it."""
    torch.manual_seed(0)
    net = _train(load_module(f"{ZOO}/plain.py:build"), train_set)
    path = tmp_path_factory.mktemp("zoo") / "plain.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def plain_audit(tmp_path_factory: pytest.TempPathFactory, weights: Path, points: ImageDataset) -> AuditResult:
    """The plain network's audit at eps 0.1, the reference of the output-form tests."""
    plain = wrap(_zoo("plain", weights), input_shape=SHAPE)
    return _audit(plain, points, tmp_path_factory.mktemp("plain-audit"), 0.1)


def _zoo(name: str, weights: Path, **kw: Any) -> nn.Module:
    return load_weights_file(load_module(f"{ZOO}/{name}.py:build", **kw), weights).eval()


def _audit(model: nn.Module, points: ImageDataset, out: Path, eps: float,
           attack_names: tuple[str, ...] = ("fgsm", "pgd"), **settings: Any) -> AuditResult:
    return audit(model, points, eps=[eps], attacks=attack_names, out_dir=out, settings=_settings(**settings),
                 report=False)


def _flags(res: AuditResult) -> dict[str, Any]:
    return {f.flag: f for f in res.flags}


def _robust(res: AuditResult) -> dict[str, torch.Tensor]:
    return {r.attack_label: r.robust for r in res.rows if r.robust is not None}


def test_declared_quantiser_is_broken_where_naive_pgd_is_not(weights: Path, points: ImageDataset,
                                                             tmp_path: Path) -> None:
    """An input quantiser declared with the identity as its stand-in: the audit attacks it
    through BPDA and finds almost nothing robust at eps 0.3; PGD called directly on the same
    model (no stand-in view) sees zero gradients and reports most points robust."""
    model = wrap(_zoo("quantised", weights, declare=True), input_shape=SHAPE)
    assert model.declaration().standins
    clean = float((model(points.x).argmax(-1) == points.y).float().mean())
    naive = attacks.create("pgd", eps=0.3)(model, points.x, points.y).robust_accuracy
    res = _audit(model, points, tmp_path, 0.3)
    assert clean > 0.8 and naive > clean - 0.15, (clean, naive)
    assert res.worst_case[0.3] <= 0.05 < naive - 0.5, (res.worst_case, naive)


def test_undeclared_quantiser_raises_the_gradients_flag(weights: Path, points: ImageDataset, tmp_path: Path) -> None:
    """The same quantiser undeclared: the audit's attacks are as blind as the naive PGD, and the
    gradients check (with the large-budget one) says the number is not to be trusted."""
    model = wrap(_zoo("quantised", weights, declare=False), input_shape=SHAPE)
    assert not model.declaration().standins
    res = _audit(model, points, tmp_path, 0.3, sanity=True)
    flags = _flags(res)
    assert res.worst_case[0.3] > 0.6
    assert not flags["gradients-not-vanishing"].passed, flags["gradients-not-vanishing"].detail
    assert "zero input gradient" in flags["gradients-not-vanishing"].detail
    assert not flags["near-chance-at-large-eps"].passed


def test_gradients_flag_says_how_to_declare_a_standin() -> None:
    text = EXPLANATIONS["gradients-not-vanishing"]
    assert "stand-in" in text and ("with_standin" in text or "NonDifferentiable" in text)


def test_undeclared_noise_is_evaluated_as_random_and_flagged(weights: Path, points: ImageDataset,
                                                             tmp_path: Path) -> None:
    """Gaussian input noise the model does not declare: the pre-check sees two forward passes
    differ, and every row is an EOT attack judged by a majority of k queries."""
    model = wrap(_zoo("noisy", weights, sigma=0.1), input_shape=SHAPE)
    res = _audit(model, points.take(100), tmp_path, 0.1, eot_samples=4, expectation_draws=4)
    flag = _flags(res)["undeclared-randomness"]
    assert not flag.passed and "random" in flag.detail
    attack_rows = [r for r in res.rows if r.attack_label != WORST_CASE_LABEL]
    assert {r.attack_label for r in attack_rows} == {"eot-fgsmx4", "eot-pgd-10x4"}
    for r in attack_rows:
        assert r.extra["random"] is True and r.extra["queries"] == 5 and r.extra["eot_samples"] == 4
    assert res.worst_case[0.1] < 0.5


def test_declared_noise_is_evaluated_as_random_without_a_flag(weights: Path, points: ImageDataset,
                                                              tmp_path: Path) -> None:
    model = wrap(_zoo("noisy", weights, sigma=0.1), input_shape=SHAPE, random=True)
    res = _audit(model, points.take(50), tmp_path, 0.1, attack_names=("fgsm",))
    assert _flags(res)["undeclared-randomness"].passed
    assert all(r.extra["random"] for r in res.rows if r.attack_label != WORST_CASE_LABEL)


def test_probabilities_are_flagged_and_handled(weights: Path, points: ImageDataset, plain_audit: AuditResult,
                                               tmp_path: Path) -> None:
    """A softmax at the end: flagged when undeclared; declared as probabilities, its log is used
    and the audit's decisions and outcomes are those of the plain logits."""
    undeclared = _audit(wrap(_zoo("softmax", weights), input_shape=SHAPE), points, tmp_path / "u", 0.1)
    assert not _flags(undeclared)["outputs-look-like-probabilities"].passed
    assert "output='probabilities'" in _flags(undeclared)["outputs-look-like-probabilities"].detail
    declared = wrap(_zoo("softmax", weights), input_shape=SHAPE, output="probabilities")
    plain = wrap(_zoo("plain", weights), input_shape=SHAPE)
    assert torch.equal(declared(points.x).argmax(-1), plain(points.x).argmax(-1))
    a, b = _audit(declared, points, tmp_path / "d", 0.1), plain_audit
    declared_flag = _flags(a)["outputs-look-like-probabilities"]
    assert not declared_flag.passed and "declared probabilities" in declared_flag.detail
    assert [r.clean_accuracy for r in a.rows] == [r.clean_accuracy for r in b.rows]
    ra, rb = _robust(a), _robust(b)
    assert ra.keys() == rb.keys() and torch.equal(ra["fgsm"], rb["fgsm"])
    # PGD's path through log(softmax) may round differently from the logits' path: at most 2 points of 200
    assert int((ra["pgd-10"] != rb["pgd-10"]).sum()) <= 2


@pytest.mark.parametrize(("form", "key"), [("dict", "logits"), ("tuple", 0), ("object", None)])
def test_output_forms_give_the_plain_numbers(form: str, key: str | int | None, weights: Path, points: ImageDataset,
                                             plain_audit: AuditResult, tmp_path: Path) -> None:
    """A dict, a tuple or an object with ``.logits``, read through the declared key: the rows
    of the plain network, point by point."""
    model = wrap(_zoo("outputs", weights, form=form), input_shape=SHAPE, key=key)
    a, b = _audit(model, points, tmp_path, 0.1), plain_audit
    assert [(r.attack_label, r.clean_accuracy, r.robust_accuracy) for r in a.rows] == \
        [(r.attack_label, r.clean_accuracy, r.robust_accuracy) for r in b.rows]
    ra, rb = _robust(a), _robust(b)
    assert ra.keys() == rb.keys() == {"fgsm", "pgd-10", WORST_CASE_LABEL} and all(torch.equal(ra[k], rb[k]) for k in ra)
    assert 0.0 < a.worst_case[0.1] < 0.9


def test_single_logit_gives_the_numbers_of_the_two_logit_model(train_set: ImageDataset, points: ImageDataset,
                                                              tmp_path: Path) -> None:
    """A sigmoid classifier (one logit z: digits 5-9 against 0-4) declared as binary-logit has
    the numbers of the plain network with two logits [0, z]."""
    binary_train = dataclasses.replace(train_set, y=(train_set.y >= 5).long(), classes=("0-4", "5-9"))
    binary_points = dataclasses.replace(points, y=(points.y >= 5).long(), classes=("0-4", "5-9"))
    torch.manual_seed(0)
    net = load_module(f"{ZOO}/outputs.py:build", form="binary")
    _train(_BCE(net), binary_train, epochs=2)
    two = load_module(f"{ZOO}/plain.py:build", classes=2).eval()
    with torch.no_grad():
        for name, p in net.net.named_parameters():
            q = two.net.get_parameter(name)
            q.copy_(torch.cat([torch.zeros_like(p), p]) if name.startswith("3.") else p)
    a = _audit(wrap(net.eval(), input_shape=SHAPE, output="binary-logit"), binary_points, tmp_path / "b", 0.1)
    b = _audit(wrap(two, input_shape=SHAPE), binary_points, tmp_path / "t", 0.1)
    assert a.rows[0].clean_accuracy > 0.8
    assert [(r.attack_label, r.robust_accuracy) for r in a.rows] == \
        [(r.attack_label, r.robust_accuracy) for r in b.rows]
    ra, rb = _robust(a), _robust(b)
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


class _BCE(nn.Module):
    """Trains a one-logit network with cross-entropy on [0, z] (the same as a sigmoid's BCE)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x).unsqueeze(1)
        return torch.cat([torch.zeros_like(z), z], 1)


@pytest.mark.slow
def test_saturated_softmax_is_flagged_and_a_margin_loss_breaks_it(weights: Path, points: ImageDataset,
                                                                  tmp_path: Path) -> None:
    """Logits divided by a temperature of 1e-3 (a kind of masking the issue does not name): the
    cross-entropy PGD stalls on the saturated softmax, the gradients and large-budget checks are
    raised, and APGD on the scale-free DLR loss finds the plain network's number."""
    hot = wrap(_zoo("temperature", weights), input_shape=SHAPE)
    plain = wrap(_zoo("plain", weights), input_shape=SHAPE)
    names = ("fgsm", "pgd", "apgd-dlr")
    a = _audit(hot, points, tmp_path / "hot", 0.1, attack_names=names, sanity=True)
    b = _audit(plain, points, tmp_path / "plain", 0.1, attack_names=names)
    rows = {r.attack_label: r.robust_accuracy for r in a.rows}
    assert rows["pgd-10"] > 0.8 and a.worst_case[0.1] <= b.worst_case[0.1] + 0.05
    flags = _flags(a)
    assert not flags["gradients-not-vanishing"].passed and not flags["near-chance-at-large-eps"].passed


def test_audits_of_two_declarations_of_the_same_weights_are_distinct(weights: Path, points: ImageDataset,
                                                                     tmp_path: Path) -> None:
    few = points.take(40)
    declared = _audit(wrap(_zoo("quantised", weights, declare=True), input_shape=SHAPE), few, tmp_path, 0.3,
                      attack_names=("fgsm",))
    undeclared = _audit(wrap(_zoo("quantised", weights, declare=False), input_shape=SHAPE), few, tmp_path, 0.3,
                        attack_names=("fgsm",))
    assert declared.config_hash != undeclared.config_hash
    assert undeclared.worst_case[0.3] > declared.worst_case[0.3] + 0.5
