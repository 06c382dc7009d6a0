"""The report is rebuilt from the results database alone and renders in headless Chromium:
every image loads and the page logs no error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bastion import attacks, models
from bastion.report import artifacts, format_table, table, write_report
from bastion.results import ArtifactRow, EvaluationRow, FlagRow, ResultsDB, TrainingRow, worst_case_rows

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")

#: injected into a copy of the page under test: records errors and image states into the DOM
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target && e.target.tagName ? e.target.tagName + ' ' + (e.target.src || '').slice(0, 40) : '';
  window.__errors.push('error: ' + (e.message || t));
}, true);
(function () { var orig = console.error; console.error = function () {
  window.__errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  orig.apply(console, arguments); }; })();
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (im) {
    return {complete: im.complete, w: im.naturalWidth, h: im.naturalHeight,
            data: im.src.indexOf('data:image/png;base64,') === 0};
  });
  var pre = document.createElement('pre'); pre.id = 'bastion-probe';
  pre.textContent = JSON.stringify({errors: window.__errors, images: imgs,
                                    tables: document.querySelectorAll('table').length,
                                    h1: (document.querySelector('h1') || {}).textContent || ''});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("headless Chromium is required for this test (Debian: apt-get install chromium; "
                         "CI installs it in scripts/offline_data.sh)")


def render(html_path: Path, tmp: Path) -> dict:
    """Open ``html_path`` (a copy with :data:`PROBE` injected) in headless Chromium; return the probe's record."""
    page = html_path.read_text(encoding="utf-8")
    assert "<head>" in page
    probed = tmp / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probed.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    m = re.search(r'<pre id="bastion-probe">(.*?)</pre>', out.stdout, re.DOTALL)
    assert m, f"the page did not finish loading in Chromium (rc={out.returncode}): {out.stderr[-2000:]}"
    import html as _html

    return json.loads(_html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def lenet(mnist_small: tuple) -> models.Classifier:
    """A plain LeNet-5, one epoch on 3,000 MNIST points (shadows the session fixture: this file
    runs alone in well under a minute)."""
    from bastion.train.config import TrainConfig
    from bastion.train.trainer import train

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = models.create("lenet5", seed=0)
        train(m, mnist_small[0].take(3000), TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=2e-3,
                                                        weight_decay=0.0, device="cpu"), progress=False)
    finally:
        torch.set_num_threads(old)
    return m.eval()


@pytest.fixture(scope="module")
def report_db(tmp_path_factory: pytest.TempPathFactory, lenet: models.Classifier,
              mnist_small: tuple) -> tuple[ResultsDB, str, Path]:
    """A DB with synthetic evaluation rows for two models and two protocols, flags, trainings,
    and real artifacts (a gallery of PGD examples from the test LeNet, a landscape, a diversity matrix)."""
    tmp = tmp_path_factory.mktemp("report")
    db = ResultsDB(tmp / "results.sqlite")
    h = "cafe1234"
    gen = torch.Generator().manual_seed(0)
    for key, defense, base in (("k-none", "none", 0.3), ("k-pgdat", "pgd-at", 0.85)):
        for protocol, drop in (("paper", 0.0), ("adaptive", 0.1)):
            for eps in (0.1, 0.2, 0.3):
                for label, attack, f in (("fgsm", "fgsm", 1.0), ("pgd-40", "pgd", 0.9)):
                    acc = max(0.0, base * f - drop - eps)
                    mask = torch.rand(100, generator=gen) < acc
                    db.add_evaluation(EvaluationRow(
                        config_hash=h, experiment="quick", dataset="mnist", model_key=key, defense=defense,
                        protocol=protocol, attack=attack, attack_label=label, attack_params={"steps": 40}, norm="linf",
                        eps=eps, n=100, clean_accuracy=0.98, robust_accuracy=float(mask.float().mean()), robust=mask,
                        seconds=1.0))
            db.add_flag(FlagRow(config_hash=h, model_key=key, defense=defense, protocol=protocol,
                                flag="monotone-in-eps", passed=True, detail="2 attack curve(s) non-increasing in eps"))
            db.add_flag(FlagRow(config_hash=h, model_key=key, defense=defense, protocol=protocol, flag="converged",
                                passed=defense != "none", detail="pgd-40 at eps=0.3: 10.0% -> 8.0% (drop 2.0 points)"))
        db.add_training(TrainingRow(model_key=key, defense=defense, params={"defense": defense}, epochs=2,
                                    epoch_seconds=1.5 if defense == "none" else 6.0, total_seconds=3.0,
                                    path=f"runs/{key}"))
    _, te = mnist_small
    x, y = te.x[:16], te.y[:16]
    res = attacks.create("pgd", eps=0.2, steps=10)(lenet, x, y, generator=torch.Generator().manual_seed(0))
    doc, tensors = artifacts.gallery(lenet, x, y, res.x_adv, max_items=6, attack="pgd-10", eps=0.2)
    db.add_artifact(ArtifactRow(config_hash=h, model_key="k-none", kind="gallery", name="pgd-10 eps=0.2", doc=doc,
                                tensors=tensors))
    doc, tensors = artifacts.landscape(lenet, x, y, eps=16 / 255, grid=9, max_points=16)
    db.add_artifact(ArtifactRow(config_hash=h, model_key="k-none", kind="landscape", name="test image 0", doc=doc,
                                tensors=tensors))
    doc, tensors = artifacts.diversity({"agreement": torch.rand(4, 4, generator=gen)}, labels=["m0", "m1", "m2", "m3"])
    db.add_artifact(ArtifactRow(config_hash=h, model_key="k-pgdat", kind="diversity", name="pool", doc=doc,
                                tensors=tensors))
    # a row of another run must not leak into this report
    db.add_evaluation(EvaluationRow(config_hash="other", experiment="other-run", dataset="mnist", model_key="k-x",
                                    defense="leaky", protocol="paper", attack="fgsm", attack_label="fgsm",
                                    attack_params={}, norm="linf", eps=0.1, n=10, clean_accuracy=1.0,
                                    robust_accuracy=1.0))
    return db, h, tmp


def test_gallery_artifact_contents(lenet: models.Classifier, mnist_small: tuple) -> None:
    _, te = mnist_small
    x, y = te.x[:32], te.y[:32]
    res = attacks.create("pgd", eps=0.3, steps=10)(lenet, x, y, generator=torch.Generator().manual_seed(0))
    doc, t = artifacts.gallery(lenet, x, y, res.x_adv, max_items=5, class_names=[str(i) for i in range(10)])
    assert t["x"].shape == t["x_adv"].shape == t["perturbation"].shape == (5, 1, 28, 28)
    assert torch.allclose(t["x_adv"] - t["x"], t["perturbation"])
    assert max(doc["linf"]) <= 0.3 + 1e-5
    # broken points come first: correct on x, wrong on x_adv
    n_broken = int((res.success & ~res.clean_success).sum())
    k = min(n_broken, 5)
    assert k > 0
    for i in range(k):
        assert doc["clean_pred"][i] == doc["labels"][i] != doc["adv_pred"][i]


def test_report_written_from_db_alone(report_db: tuple[ResultsDB, str, Path]) -> None:
    db, h, tmp = report_db
    md, page = write_report(db, h, tmp / "out", title="Quick run")
    text = md.read_text()
    assert text.startswith("# Quick run")
    for needle in ("pgd-at", "paper", "adaptive", "worst case", "converged", "RAISED", "Training cost", "4.00x",
                   "Adversarial examples", "Loss landscapes", "Diversity"):
        assert needle in text, needle
    assert "leaky" not in text  # another run's rows stay out
    for ref in re.findall(r"\]\((figures/[^)]+\.png)\)", text):
        assert (md.parent / ref).stat().st_size > 0
    html_text = page.read_text()
    assert "http://" not in html_text and "https://" not in html_text and "<script" not in html_text
    assert html_text.count("<img ") == len(re.findall(r"\]\((figures/[^)]+\.png)\)", text)) >= 6


def test_training_history_shows_the_epochs_a_check_warned(tmp_path: Path) -> None:
    """A fast-AT history whose held-out check warned (catastrophic overfitting) reaches the
    report as a table, with the warned epochs counted and the last epoch called out."""
    db = ResultsDB(tmp_path / "results.sqlite")
    h = "beef5678"
    db.add_evaluation(EvaluationRow(config_hash=h, experiment="fast", dataset="mnist", model_key="k-fast",
                                    defense="fast-at", protocol="paper", attack="pgd", attack_label="pgd-40",
                                    attack_params={}, norm="linf", eps=0.3, n=10, clean_accuracy=0.9,
                                    robust_accuracy=0.0, robust=torch.zeros(10, dtype=torch.bool)))
    meta = {"best_epoch": 3, "history": [
        {"epoch": 1, "lr": 0.001, "seconds": 10.0, "train_loss": 1.2, "train_acc": 0.6, "val_acc": None,
         "extra": {"holdout_pgd_acc": 0.5, "holdout_attack_acc": 0.6}},
        {"epoch": 2, "lr": 0.002, "seconds": 11.0, "train_loss": 0.4, "train_acc": 0.9, "val_acc": None,
         "extra": {"holdout_pgd_acc": 0.0, "holdout_attack_acc": 0.9, "pgd_far_below_training_attack": True}},
        {"epoch": 3, "lr": 0.0, "seconds": 12.0, "train_loss": 0.2, "train_acc": 0.95, "val_acc": None,
         "extra": {"holdout_pgd_acc": 0.0, "holdout_attack_acc": 0.97, "pgd_far_below_training_attack": True,
                   "pcl_active": True, "lr": 9.0}},
    ]}
    doc, tensors = artifacts.training_history(meta)
    assert tensors is None and [e["holdout_pgd_acc"] for e in doc["epochs"]] == [0.5, 0.0, 0.0]
    # an extra key that collides with a field is kept beside it, not over it
    assert doc["epochs"][2]["lr"] == 0.0 and doc["epochs"][2]["extra.lr"] == 9.0
    db.add_artifact(ArtifactRow(config_hash=h, model_key="k-fast", kind="history", name="fast-at", doc=doc))
    db.add_artifact(ArtifactRow(config_hash=h, model_key="k-empty", kind="history", name="user",
                                doc=artifacts.training_history({})[0]))
    md, _ = write_report(db, h, tmp_path / "out")
    text = md.read_text()
    part = text[text.index("Training histories"):]
    assert "pgd_far_below_training_attack in 2 of 3 epochs" in part
    assert "pcl_active in" not in part  # a true flag that is not a warning is shown, not counted
    assert "in the last epoch too: pgd_far_below_training_attack" in part and "best epoch 3" in part
    assert part.count("| 0.97 |") == 1 and "user" not in part  # the table's rows; an empty history is left out


def test_report_from_a_path_and_the_text_table(report_db: tuple[ResultsDB, str, Path]) -> None:
    """``write_report`` and ``table`` take a database path too; the text table has a line per
    (defense, protocol, attack), the per-budget aggregate last with the raised flags of its
    (model, protocol), and nothing of another run."""
    db, h, tmp = report_db
    md1, html1 = write_report(db, h, tmp / "from-db", title="Quick run")
    md2, html2 = write_report(db.path, h, tmp / "from-path", title="Quick run")
    assert md1.read_text() == md2.read_text() and html1.read_text() == html2.read_text()
    with pytest.raises(Exception, match="no evaluations"):
        write_report(db, "no-such-run", tmp / "none")
    text = table(db.path, h)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["defense", "protocol", "attack", "clean"] and set(lines[1]) == {"-"}
    assert len(lines) == 2 + 2 * 2 * 2  # (fgsm, pgd-40) x 2 protocols x 2 models
    assert "leaky" not in text and "Linf 0.3" in text
    assert table(db, h, defense="none", protocol="paper").count("\n") == 3
    assert table(db, "no-such-run") == "(no results)"
    rows = db.evaluations(config_hash=h, model_key="k-none", protocol="paper")
    lines = format_table([*worst_case_rows(rows), *rows], db.flags(config_hash=h)).splitlines()
    assert [ln.split()[2] for ln in lines[2:]] == ["fgsm", "pgd-40", "worst"]
    assert lines[-1].split()[-1] == "1"  # the "converged" flag raised for the undefended model


def test_tables_show_the_intervals(report_db: tuple[ResultsDB, str, Path]) -> None:
    """Every accuracy of the text table and of the report's tables carries its 95% Clopper-Pearson
    interval: the cells are those of the rows' own intervals, the aggregate's from its mask."""
    from bastion.results import worst_case_estimate
    from bastion.results.intervals import format_interval

    db, h, tmp = report_db
    rows = db.evaluations(config_hash=h, model_key="k-pgdat", protocol="adaptive")
    pgd = next(r for r in rows if r.attack_label == "pgd-40" and r.eps == 0.1)
    assert pgd.robust_interval is not None and pgd.clean_interval is not None
    cell = format_interval(pgd.robust_accuracy, pgd.robust_interval)
    clean = format_interval(pgd.clean_accuracy, pgd.clean_interval)
    assert "[" in cell and clean.startswith("98.0 [")
    line = next(ln for ln in table(db, h, defense="pgd-at", protocol="adaptive").splitlines() if " pgd-40 " in ln)
    assert cell in line and f" {100 * pgd.clean_accuracy:.1f} " in line and clean not in line
    at = [r for r in rows if r.eps == 0.1]
    worst = worst_case_estimate(at)
    assert worst is not None and worst.interval is not None
    md, _ = write_report(db, h, tmp / "intervals")
    text = md.read_text()
    paper = next(r for r in db.evaluations(config_hash=h, model_key="k-pgdat", protocol="paper")
                 if r.attack_label == "pgd-40" and r.eps == 0.1)
    assert f"| pgd-40 | Linf 0.1 | {format_interval(paper.robust_accuracy, paper.robust_interval)} | {cell} |" in text
    assert f" | {cell} |" in text and f" | {worst} |" in text and "Clopper-Pearson" in text


def test_report_renders_in_chromium(report_db: tuple[ResultsDB, str, Path]) -> None:
    db, h, tmp = report_db
    _, page = write_report(db, h, tmp / "chromium")
    probe = render(page, tmp)
    assert probe["errors"] == []
    assert len(probe["images"]) >= 6
    for im in probe["images"]:
        assert im["data"] and im["complete"] and im["w"] > 0 and im["h"] > 0, im
    assert probe["tables"] >= 3
    assert probe["h1"].startswith("Bastion report")


def test_probe_sees_a_broken_image(tmp_path: Path) -> None:
    """The Chromium check can fail: a page with an image that cannot load is reported."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><h1>x</h1>'
                    '<img src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>')
    probe = render(page, tmp_path)
    assert probe["images"][0]["w"] == 0
    assert any("boom" in e for e in probe["errors"])
