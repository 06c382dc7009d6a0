"""Auditing a network Bastion did not train: output adapters, loading a user's factory and
weights (never a full unpickle), checks before attacking, and the audit's rows, flags and report."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.cli import main
from bastion.errors import BastionError
from bastion.harness.audit import audit, pre_checks
from bastion.models import user

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "user_net.py"


class _Tuple(nn.Module):
    def forward(self, x: torch.Tensor):
        return (x.flatten(1)[:, :3] * 2.0, "ignored")


class _Binary(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1, keepdim=True) - 1.0


def test_output_adapters_give_logits() -> None:
    x = torch.rand(4, 1, 2, 2)
    t = user.wrap(_Tuple(), input_shape=(1, 2, 2), key=0)
    assert t.num_classes == 3 and torch.allclose(t(x), x.flatten(1)[:, :3] * 2.0)
    b = user.wrap(_Binary(), input_shape=(1, 2, 2), output="binary-logit")
    z = x.flatten(1).sum(1) - 1.0
    assert b.num_classes == 2 and torch.allclose(torch.softmax(b(x), -1)[:, 1], torch.sigmoid(z), atol=1e-6)
    probs = user.wrap(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Softmax(-1)), input_shape=(1, 2, 2),
                      output="probabilities")
    assert torch.allclose(probs(x).exp().sum(-1), torch.ones(4), atol=1e-5)
    with pytest.raises(BastionError, match="not a tensor"):
        user.wrap(_Tuple(), input_shape=(1, 2, 2))  # a tuple with no key declared
    with pytest.raises(BastionError, match="output='odds'"):
        user.wrap(_Binary(), input_shape=(1, 2, 2), output="odds")


def test_factory_and_weights_load_without_unpickling(tmp_path) -> None:
    net = user.load_module(f"{EXAMPLE}:build", width=4)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    fresh = user.load_weights_file(user.load_module(f"{EXAMPLE}:build", width=4), tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True))
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:  # a pickle of an arbitrary object: refused, never executed
        pickle.dump({"w": _Binary()}, f)
    with pytest.raises(BastionError, match="weights_only"):
        user.load_weights_file(user.load_module(f"{EXAMPLE}:build", width=4), evil)
    with pytest.raises(BastionError, match="do not fit"):
        user.load_weights_file(user.load_module(f"{EXAMPLE}:build", width=8), tmp_path / "w.pt")
    with pytest.raises(BastionError, match="no callable 'nope'"):
        user.load_module(f"{EXAMPLE}:nope")


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1) + 0.3 * torch.randn_like(x.flatten(1)))


def test_undeclared_randomness_is_detected_and_evaluated_as_random() -> None:
    from bastion.eval.judge import is_random

    model = user.wrap(_Noisy(), input_shape=(1, 2, 2))
    checked, flags = pre_checks(model, torch.rand(8, 1, 2, 2))
    by = {f.name: f for f in flags}
    assert not by["undeclared-randomness"].passed and is_random(checked) and hasattr(checked, "decide")
    softmax = user.wrap(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Softmax(-1)), input_shape=(1, 2, 2))
    _, flags = pre_checks(softmax, torch.rand(8, 1, 2, 2))
    assert not {f.name: f for f in flags}["outputs-look-like-probabilities"].passed


@pytest.mark.needs_data("mnist")
def test_audit_a_user_model_end_to_end(tmp_path, capsys) -> None:
    """The example network, trained briefly, audited from the command line: the table, the
    database (rows, worst case, flags) and the report; a second audit recomputes nothing."""
    from bastion import data
    from bastion.models.user import wrap
    from bastion.results.db import ResultsDB

    torch.manual_seed(0)
    train = data.load("mnist", "train").take(2000)
    net = user.load_module(f"{EXAMPLE}:build", width=8)
    model = wrap(net, input_shape=(1, 28, 28), key="logits", mean=[0.1307], std=[0.3081])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(0, 2000, 100):
        loss = nn.functional.cross_entropy(model(train.x[i:i + 100]), train.y[i:i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    argv = ["audit", "--model", f"{EXAMPLE}:build", "--model-arg", "width=8", "--weights", str(tmp_path / "net.pt"),
            "--key", "logits", "--mean", "0.1307", "--std", "0.3081", "--dataset", "mnist", "-n", "60",
            "--eps", "0.1,0.3", "--attacks", "fgsm", "--no-autoattack", "--out", str(tmp_path / "audit")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "worst case" in out and "report:" in out
    db = ResultsDB(tmp_path / "audit" / "results.sqlite")
    rows = db.evaluations()
    labels = {(r.attack_label, r.eps) for r in rows}
    assert labels == {("fgsm", 0.1), ("fgsm", 0.3), ("worst case", 0.1), ("worst case", 0.3)}
    fgsm = {r.eps: r for r in rows if r.attack_label == "fgsm"}
    assert fgsm[0.1].clean_accuracy > 0.5 and fgsm[0.3].robust_accuracy <= fgsm[0.1].robust_accuracy
    assert {f.flag for f in db.flags()} >= {"undeclared-randomness", "outputs-look-like-probabilities"}
    assert (tmp_path / "audit" / "report" / "report.html").is_file()
    created = {(r.attack_label, r.eps): r.created for r in rows}
    assert main(argv) == 0  # the same audit again: every row is found, nothing recomputed
    assert {(r.attack_label, r.eps): r.created for r in db.evaluations()} == created
    res = audit(model, data.load("mnist", "test").take(60), eps=[0.1, 0.3], attacks=["fgsm"],
                out_dir=tmp_path / "py", report=False,
                settings=None)
    assert set(res.worst_case) == {0.1, 0.3} and res.report is None


@pytest.mark.needs_data("mnist")
def test_audit_tutorial_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    """docs/audit.md's Python block runs as written (from a working directory holding the
    example) and prints a table with the worst case and the pre-attack flags."""
    import re
    import shutil

    text = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "examples" / "user_net.py")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, "docs/audit.md", "exec"), {})
    out = capsys.readouterr().out
    assert "worst case" in out and "undeclared-randomness" in out
    assert (tmp_path / "user_net.pt").is_file() and (tmp_path / "runs/audit-tutorial/report/report.html").is_file()
