"""Auditing a network Bastion did not train: output adapters, loading a user's factory and
weights (never a full unpickle), checks before attacking, and the audit's rows, flags and report."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.cli import main
from bastion.data import base as data_base
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


def test_channels_last_is_the_same_function_under_another_key(tmp_path) -> None:
    """``channels_last=True`` stores the conv weights channels-last, gives the same decisions
    as the default layout on clean and attacked points (up to float rounding), and keys its
    rows apart from the default audit's; a non-bool value is refused by name."""
    from bastion.harness.audit import audit as run_audit
    from bastion.models.user import wrap

    torch.manual_seed(0)
    net = user.load_module(f"{EXAMPLE}:build", width=4)
    pts = _points((1, 28, 28), n=40)
    kw = dict(eps=[0.05], attacks=["fgsm", "pgd"], out_dir=tmp_path, report=False,
              settings=None)
    plain = run_audit(wrap(net, input_shape=(1, 28, 28), key="logits"), pts, **kw)
    fast_model = wrap(net, input_shape=(1, 28, 28), key="logits")
    fast = run_audit(fast_model, pts, **kw, channels_last=True)
    conv = next(m for m in fast_model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.config_hash != plain.config_hash
    by_label = {(r.attack_label, r.eps): r for r in plain.rows}
    for r in fast.rows:
        other = by_label[(r.attack_label, r.eps)]
        assert r.clean_accuracy == other.clean_accuracy
        assert abs(r.robust_accuracy - other.robust_accuracy) <= 1 / 40 + 1e-9
    with pytest.raises(BastionError, match="channels_last='yes'"):
        run_audit(wrap(net, input_shape=(1, 28, 28), key="logits"), pts, **kw, channels_last="yes")  # type: ignore[arg-type]


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


# ---------------------------------------------------------------------------- bad input: one clear line each
PLAIN = ROOT / "examples" / "zoo" / "plain.py"


def _one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


def test_missing_factory_file_or_module_is_one_line() -> None:
    with pytest.raises(BastionError) as e:
        user.load_module(f"{PLAIN}:nope")
    assert "has no callable 'nope'" in _one_line(e) and "plain.py" in str(e.value)
    with pytest.raises(BastionError) as e:
        user.load_module("examples/zoo/no_such_net.py:build")
    assert "no file 'examples/zoo/no_such_net.py'" in _one_line(e)
    with pytest.raises(BastionError) as e:
        user.load_module("no_such_package.nets:build")
    assert "cannot import 'no_such_package.nets'" in _one_line(e)


def test_missing_factory_from_the_command_line(tmp_path, capsys) -> None:
    import numpy as np

    np.savez(tmp_path / "points.npz", x=np.zeros((4, 1, 28, 28), np.float32), y=np.zeros(4, np.int64))
    argv = ["audit", "--model", f"{PLAIN}:nope", "--data", str(tmp_path / "points.npz"), "--eps", "0.1",
            "--out", str(tmp_path / "audit")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bastion: error: ") and "has no callable 'nope'" in err and "\n" not in err
    assert not (tmp_path / "audit").exists()


def test_an_unknown_autoattack_parameter_is_one_line(tmp_path, capsys) -> None:
    import numpy as np

    np.savez(tmp_path / "points.npz", x=np.zeros((4, 1, 28, 28), np.float32), y=np.zeros(4, np.int64))
    argv = ["audit", "--model", f"{PLAIN}:build", "--data", str(tmp_path / "points.npz"), "--eps", "0.1",
            "--autoattack-param", "n_querys=100", "--out", str(tmp_path / "audit")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "has no parameter 'n_querys'" in err and "\n" not in err


def test_weights_that_do_not_fit_name_the_first_key_and_both_shapes(tmp_path) -> None:
    torch.save(user.load_module(f"{PLAIN}:build", hidden=32).state_dict(), tmp_path / "w32.pt")
    with pytest.raises(BastionError) as e:
        user.load_weights_file(user.load_module(f"{PLAIN}:build"), tmp_path / "w32.pt")
    assert "'net.1.weight' has shape (32, 784) in the file but (64, 784) in the model" in _one_line(e)
    state = user.load_module(f"{PLAIN}:build").state_dict()
    torch.save({k: v for k, v in state.items() if k != "net.3.bias"}, tmp_path / "missing.pt")
    with pytest.raises(BastionError, match=r"the file has no 'net.3.bias' \(the model's is \(10,\)\)"):
        user.load_weights_file(user.load_module(f"{PLAIN}:build"), tmp_path / "missing.pt")
    torch.save({**state, "head.weight": torch.zeros(2, 3)}, tmp_path / "extra.pt")
    with pytest.raises(BastionError, match=r"the model has no 'head.weight' \(shape \(2, 3\) in the file\)"):
        user.load_weights_file(user.load_module(f"{PLAIN}:build"), tmp_path / "extra.pt")


class _Marker:
    """Unpickling this object writes a file: proof that a loader executed the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "executed"))


def test_a_pickle_where_weights_are_expected_is_refused_and_never_executed(tmp_path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Marker(control)))  # the payload works: a full unpickle writes the file
    assert control.read_text() == "executed"
    marker = tmp_path / "marker"
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # torch.save(model), not torch.save(model.state_dict())
    for i, payload in enumerate([{"net.1.weight": _Marker(marker)}, _Marker(marker), net]):
        path = tmp_path / f"evil{i}.pt"
        torch.save(payload, path)  # a custom object, or a full pickled nn.Module
        with pytest.raises(BastionError) as e:
            user.load_weights_file(user.load_module(f"{PLAIN}:build"), path)
        assert "weights_only=True" in _one_line(e) and "never unpickles" in str(e.value)
        assert not marker.exists()


def _points(shape: tuple[int, int, int], n: int = 8) -> data_base.ImageDataset:
    c = shape[0]
    return data_base.ImageDataset(name="points", split="test", x=torch.rand(n, *shape), y=torch.arange(n) % 10,
                                  classes=tuple(str(i) for i in range(10)), mean=(0.5,) * c, std=(0.25,) * c)


def test_wrong_input_size_is_one_line(tmp_path) -> None:
    model = user.wrap(user.load_module(f"{PLAIN}:build"), input_shape=(1, 28, 28))
    with pytest.raises(BastionError) as e:
        audit(model, _points((3, 32, 32)), eps=[0.1], out_dir=tmp_path, report=False)
    assert "has 3 channels but the model expects 1" in _one_line(e)
    with pytest.raises(BastionError) as e:
        audit(model, _points((1, 32, 32)), eps=[0.1], out_dir=tmp_path, report=False)
    assert "has shape (1, 1, 32, 32) but the model expects (N, 1, 28, 28)" in _one_line(e)
    with pytest.raises(BastionError) as e:  # declared to match the data, but the network cannot take it
        user.wrap(user.load_module(f"{PLAIN}:build"), input_shape=(3, 32, 32))
    assert "fails on inputs of shape (N, 3, 32, 32)" in _one_line(e) and "784" in str(e.value)
    assert not (tmp_path / "results.sqlite").exists()


class _NaN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x.flatten(1))
        return torch.where(x.flatten(1)[:, :1] > 0.5, torch.full_like(out, float("nan")), out)


def test_nan_outputs_stop_the_audit(tmp_path) -> None:
    model = user.wrap(_NaN(), input_shape=(1, 28, 28))
    pts = _points((1, 28, 28))
    pts.x[0, 0, 0, 0] = 0.9  # one point whose output is NaN
    with pytest.raises(BastionError) as e:
        audit(model, pts, eps=[0.1], out_dir=tmp_path, report=False)
    assert "non-finite outputs (nan or inf)" in _one_line(e)
