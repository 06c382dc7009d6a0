"""Scaling out: rows measured in shards, jobs run against a private copy of their rows (the
driver alone writes the database), and the Ray executor giving the in-process rows."""

from __future__ import annotations

import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

from bastion.errors import ConfigError
from bastion.eval.loop import measure, shard_bounds, shard_seed
from bastion.eval.protocols import Subject, build_attacks, plan
from bastion.harness import config as hc
from bastion.harness import executor as ex
from bastion.harness import runner
from bastion.harness.cache import load_cached
from bastion.harness.eval_job import EvalJob, eval_data
from bastion.results import snapshot

sys.path.insert(0, str(Path(__file__).parent))
from test_harness import TINY  # noqa: E402


def _cfg(tmp: Path, models: Path | None = None, **overrides: object) -> hc.HarnessConfig:
    """The tiny harness config with its output under ``tmp`` (the trained ``models`` copied
    into its cache, so that only the evaluation runs)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "c.toml").write_text(TINY.format(out=tmp / "out"))
    if models is not None:
        shutil.copytree(models, tmp / "out" / "models")
    small = {"evaluation.batch_size": 16, "dataset.eval_samples": 40}
    return hc.load_harness_config(tmp / "c.toml", {**small, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config's two models, trained once for the module."""
    cfg = _cfg(tmp_path_factory.mktemp("trained"))
    ex.InProcessExecutor().run([j for j in runner.plan_jobs(cfg) if j.kind == "train"])
    return Path(cfg.out_dir) / "models"


def _rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return sorted(con.execute("SELECT config_hash, model_key, protocol, attack_label, eps, n, clean_accuracy, "
                                  "robust_accuracy, per_sample, gradients, forwards, extra FROM evaluations"))


class Isolated:
    """The Ray executor's data path without Ray: each job against a private copy of its rows,
    its changes applied by this 'driver'."""

    def run(self, jobs):
        out = []
        for job in jobs:
            key, h = ex.scope(job)
            stats, changes = ex.run_isolated(ex.to_plain(job), snapshot.export(job.db_path, key, h))
            snapshot.apply(job.db_path, changes)
            out.append(stats)
        return out


def test_shard_bounds_cover_every_point_once():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    assert shard_seed(0, 1) != shard_seed(0, 2) and shard_seed(0, 1) == shard_seed(0, 1)
    with pytest.raises(ConfigError, match=r"evaluation.shards=0 must be an integer >= 1"):
        hc.load_harness_config(None, {"evaluation.shards": 0})


def test_a_sharded_row_is_its_shards_measured_apart_and_each_shard_resumes(tmp_path, trained):
    cfg = _cfg(tmp_path / "a", trained, **{"evaluation.shards": 3})
    assert hc.config_hash(cfg) != hc.config_hash(_cfg(tmp_path / "b"))
    jobs = runner.plan_jobs(cfg)
    shards = [j for j in jobs if isinstance(j, EvalJob) and j.shard is not None]
    assert len(shards) == 3 * 2 * 2  # 3 shards x 2 models x 2 protocols
    ex.InProcessExecutor().run(jobs[:3])  # two trainings, then the first shard: "killed" after it
    stats = ex.InProcessExecutor().run(jobs)
    assert stats[2]["measured"] == 0, "a kept shard is not measured again"
    measured = [s["measured"] for j, s in zip(jobs, stats, strict=True) if getattr(j, "shard", None) is not None]
    assert measured == [0] + [4] * 11, "each shard measures the 4 rows of its protocol once"
    # the stored row is the three shards, each measured on its own points with its own seed
    job = next(j for j in jobs if isinstance(j, EvalJob) and j.shard is None and j.protocol == "adaptive")
    st = cfg.evaluation
    model = load_cached(job.out_dir, job.key, torch.device("cpu"), evaluate=True)
    threat = next(t for t in plan("adaptive", Subject(model), build_attacks(cfg.attacks, st), st)
                  if t.label == "pgd-5" and float(t.attack.eps) == 0.2)
    data = eval_data(cfg)
    parts = [measure(threat, data.x[a:b], data.y[a:b], batch_size=st.batch_size, seed=shard_seed(st.seed, i),
                     device=torch.device("cpu")).robust for i, (a, b) in enumerate(shard_bounds(len(data), 3))]
    with torch.no_grad():
        clean = model(data.x).argmax(-1) == data.y
    from bastion.results.db import ResultsDB

    row = next(r for r in ResultsDB(cfg.db_path).evaluations(config_hash=job.config_hash, model_key=job.key,
                                                               protocol="adaptive")
               if r.attack_label == "pgd-5" and r.eps == pytest.approx(0.2))
    assert torch.equal(row.robust, torch.cat(parts) & clean)
    assert row.gradients > 0 and len(row.robust) == len(data)
    with sqlite3.connect(cfg.db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM row_shards").fetchone()[0] == 0, "shards are dropped once merged"


def test_jobs_on_a_private_copy_give_the_in_process_rows(tmp_path, trained):
    """The driver-only-writer path (what every Ray task runs) stores the in-process rows,
    per-sample outcomes included, sharded or not; run again it redoes nothing."""
    for shards in (1, 2):
        a = _cfg(tmp_path / f"a{shards}", trained, **{"evaluation.shards": shards})
        b = _cfg(tmp_path / f"b{shards}", trained, **{"evaluation.shards": shards})
        runner.run(a, progress=False)
        runner.run(b, executor=Isolated(), progress=False)  # type: ignore[arg-type]
        assert _rows(a.db_path) == _rows(b.db_path) and len(_rows(a.db_path)) == 24
    again = runner.run(b, executor=Isolated(), progress=False)  # type: ignore[arg-type]
    assert again.evaluated == 0 and again.trained == 0


def test_snapshot_changes_drop_and_put_by_natural_key(tmp_path):
    path = tmp_path / "r.sqlite"
    snapshot.ensure(path)
    with sqlite3.connect(path) as con:
        con.execute("INSERT INTO row_shards VALUES ('h','m','p','a','linf',0.1,10,2,0,0,5,x'00','{}')")
    before = snapshot.export(path, "m", "h")
    with sqlite3.connect(path) as con:
        con.execute("DELETE FROM row_shards")
        con.execute("INSERT INTO row_shards VALUES ('h','m','p','a','linf',0.1,10,2,1,5,10,x'00','{}')")
    changes = snapshot.diff(before, snapshot.export(path, "m", "h"))
    assert changes["row_shards"]["drop"] == [("h", "m", "p", "a", "linf", 0.1, 10, 2, 0)]
    assert [r["shard"] for r in changes["row_shards"]["put"]] == [1]
    with pytest.raises(ValueError, match="unknown column"):
        snapshot.apply(path, {"row_shards": {"put": [{"bogus; DROP TABLE x": 1}], "drop": []}})


def test_executor_names_are_checked_and_ray_missing_says_how_to_install(monkeypatch):
    with pytest.raises(ConfigError, match=r"executor='dask' is not one of 'inprocess', 'ray'"):
        runner.make_executor("dask")
    with pytest.raises(ConfigError, match=r"apply to --executor ray only"):
        runner.make_executor("inprocess", address="x")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r'needs Ray: pip install "bastion-adv\[ray\]"'):
        runner.make_executor("ray", progress=False).run([])


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_in_process_rows_resumes_and_reports_failures(tmp_path, trained, ray_local):
    from bastion.harness.ray_executor import JobsFailed, RayExecutor

    a, b = (_cfg(tmp_path / n, trained, **{"evaluation.shards": 2}) for n in "ab")
    runner.run(a, progress=False)
    jobs = runner.plan_jobs(b)
    RayExecutor().run(jobs[:4])  # a driver that stopped after four jobs
    stats = RayExecutor().run(jobs)
    assert stats[0]["trained"] == 0 and stats[2]["measured"] == 0, "finished jobs are not redone"
    assert _rows(a.db_path) == _rows(b.db_path)
    # a job that fails is reported; what needs it is skipped; the rest is done
    c = _cfg(tmp_path / "c", trained, **{"evaluation.shards": 2})
    jobs = runner.plan_jobs(c)
    broken = next(p for p in Path(c.out_dir).glob("models/fgsm-at-*/final/*.safetensors"))
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(JobsFailed, match=r"job\(s\) failed: eval fgsm-at \(paper, shard 1\): .*skipped because a job "
                                         r"they need failed: eval fgsm-at \(paper\)"):
        RayExecutor().run(jobs)
    with sqlite3.connect(c.db_path) as con:
        done = {r[0] for r in con.execute("SELECT DISTINCT model_key FROM evaluations")}
    assert len(done) == 1 and next(iter(done)).startswith("none-")


def test_harness_evaluates_a_user_model_on_a_streamed_image_folder(tmp_path):
    """``dataset.path``: the hashed subset of an image folder, read lazily or in memory, gives
    the same rows; the folder's path is not in the config hash, its points are."""
    from PIL import Image

    from bastion import data
    from bastion.data.lazy import LazyImages
    from test_harness_user_models import EXAMPLE, _weights
    from test_harness_user_models import TINY as USER

    weights = _weights(tmp_path / "user_net.pt")

    def _config(out: str, text: str, overrides: dict) -> hc.HarnessConfig:
        p = tmp_path / f"{out}.toml"
        p.write_text(text.format(out=tmp_path / out, example=EXAMPLE, weights=weights))
        return hc.load_harness_config(p, overrides)

    mnist = data.load("mnist", "test").take(100)  # every digit
    folder = tmp_path / "folder"
    for i, (img, label) in enumerate(zip(mnist.x, mnist.y, strict=True)):
        (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0] * 255).round().byte().numpy(), mode="L").save(folder / str(int(label)) / f"{i}.png")
    text = USER.split("[[models]]\nid = \"fgsm-at\"")[0] + USER[USER.index("[[attacks]]"):]
    over = {"dataset.path": str(folder), "dataset.eval_samples": 24, "evaluation.protocols": ["adaptive"],
            "evaluation.report": False}
    rows = {}
    for stream in (True, False):
        cfg = _config(f"s{stream}", text, {**over, "dataset.stream": stream})
        assert isinstance(eval_data(cfg).x, LazyImages) is stream
        runner.run(cfg, progress=False)
        rows[stream] = _rows(cfg.db_path)
    assert rows[True] == rows[False] and len(rows[True]) == 4  # fgsm and the worst case at 2 budgets
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert hc.config_hash(_config("m", text, {**over, "dataset.path": str(moved)})) == rows[True][0][0]
    with pytest.raises(ConfigError, match=r"dataset.path=.* would be trained here"):
        _config("t", USER, {"dataset.path": str(folder)})
    with pytest.raises(ConfigError, match=r"dataset.path='/nonexistent' is not a directory"):
        _config("t", text, {"dataset.path": "/nonexistent"})


def test_audit_fingerprint_of_a_streamed_folder_is_the_in_memory_one(tmp_path):
    """`bastion audit --data DIR` reads a large folder lazily (data.from_path); its results
    are found again whether the folder was streamed or not."""
    from PIL import Image

    from bastion import data, models
    from bastion.data.lazy import LazyImages
    from bastion.harness.audit import _fingerprint

    for i in range(12):
        (tmp_path / str(i % 3)).mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / str(i % 3) / f"{i}.png")
    lazy = data.open_image_folder(tmp_path, stream=True)
    loaded = data.from_path(tmp_path)
    assert isinstance(lazy.x, LazyImages) and not isinstance(loaded.x, LazyImages)
    model = models.create("lenet5", seed=0)
    assert _fingerprint(model, lazy, {}) == _fingerprint(model, loaded, {})
