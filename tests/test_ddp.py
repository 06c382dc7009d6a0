"""Data-parallel training (bastion.train.distributed): two gloo processes against one.

The two-process runs are real: ``python -m torch.distributed.run --standalone`` launches the
worker below (written to a temporary file), which trains with ``train(..., ranks=...)`` on small
synthetic data. The test process imports the same file to train the single-process reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bastion.cli import build_parser, main
from bastion.cli.train import _worker_argv
from bastion.errors import ConfigError
from bastion.train.augment import crop_flip, draw_crop_flip
from bastion.train.distributed import Ranks, check_nproc, from_env
from bastion.train.trainer import _epoch_seed, make_optimizer, train

WORKER = textwrap.dedent('''
    """Worker of tests/test_ddp.py, launched by torchrun (``check`` or ``kill K`` mode)."""
    import json
    import logging
    import os
    import signal
    import sys
    from dataclasses import dataclass
    from pathlib import Path

    import torch
    from safetensors.torch import save_file
    from torch import nn

    from bastion import defenses
    from bastion.data.base import ImageDataset
    from bastion.models.base import NormalizedClassifier
    from bastion.train.config import TrainConfig
    from bastion.train.distributed import session
    from bastion.train.objectives import Objective
    from bastion.train.trainer import train

    #: 129 points in batches of 32: the last batch has one point, so rank 0's part of it is empty
    PLAIN = TrainConfig(epochs=3, batch_size=32, lr=0.1, weight_decay=1e-3, seed=5, device="cpu")
    FANCY = TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=5, augment="crop-flip", crop_padding=2, device="cpu")
    PGD_AT = defenses.create("pgd-at", eps=0.1, attack_params={"steps": 2, "alpha": 0.05})


    def dataset(n=129):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 3, 16, 16, generator=g)
        y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long() + 2 * (x[:, 2].mean((1, 2)) > 0.5).long()
        return ImageDataset("synthetic", "train", x, y, tuple("abcdefghij"), (0.5,) * 3, (0.29,) * 3)


    def model(fancy):
        """A small classifier; ``fancy`` adds batch norm and dropout."""
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if fancy else []) + [nn.ReLU()]
        layers += ([nn.Dropout(0.2)] if fancy else []) + [nn.AvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)]
        return NormalizedClassifier(nn.Sequential(*layers), mean=(0.5,) * 3, std=(0.29,) * 3, num_classes=10,
                                    input_shape=(3, 16, 16))


    @dataclass(frozen=True)
    class CountingPGDAT(Objective):
        """PGD adversarial training that counts the points it crafts examples on."""

        name: str = "counting-pgd-at"

        def __call__(self, model, x, y):
            self.context["points"] = self.context.get("points", 0) + len(x)
            return PGD_AT(model, x, y)


    class Stop(Exception):
        pass


    def stop_after_first(rec):
        if rec.epoch == 1:
            raise Stop


    def save(model, path):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


    def check(out, ranks):
        warnings = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: warnings.append(record.getMessage())
        logging.getLogger("bastion.train.distributed").addHandler(handler)
        m = model(False)
        train(m, dataset(), PLAIN, progress=False, ranks=ranks)
        save(m, out / f"plain-{ranks.rank}.safetensors")
        m, objective = model(True), CountingPGDAT()
        train(m, dataset(), FANCY, objective=objective, progress=False, ranks=ranks)
        save(m, out / f"fancy-{ranks.rank}.safetensors")
        m = model(False)
        train(m, dataset(), PLAIN, out_dir=out / "straight", progress=False, ranks=ranks)
        save(m, out / f"straight-{ranks.rank}.safetensors")
        try:
            train(model(False), dataset(), PLAIN, out_dir=out / "stopped", progress=False, ranks=ranks,
                  callbacks=[stop_after_first])
        except Stop:
            pass
        m = model(False)
        res = train(m, dataset(), PLAIN, out_dir=out / "stopped", progress=False, ranks=ranks)
        save(m, out / f"resumed-{ranks.rank}.safetensors")
        info = {"world": ranks.world, "warnings": warnings, "points": objective.context["points"],
                "resumed_from": res.resumed_from}
        (out / f"info-{ranks.rank}.json").write_text(json.dumps(info))


    def killed(out, ranks, kill_after):
        def kill(rec):
            if rec.epoch == kill_after and ranks.rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a killed job

        train(model(True), dataset(), FANCY, objective=PGD_AT, out_dir=out, progress=False, ranks=ranks,
              callbacks=[kill])


    if __name__ == "__main__":
        torch.set_num_threads(1)
        with session("cpu") as ranks:
            if sys.argv[1] == "check":
                check(Path(sys.argv[2]), ranks)
            else:
                killed(Path(sys.argv[2]), ranks, int(sys.argv[3]))
''')


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The small models here train far faster on one thread (and the machine may be shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    path = tmp_path_factory.mktemp("ddp") / "ddp_worker.py"
    path.write_text(WORKER)
    spec = importlib.util.spec_from_file_location("ddp_worker", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(worker: ModuleType, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker.__file__),
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_ranks(worker: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One two-process run of the worker's ``check`` mode (about 10 s)."""
    out = tmp_path_factory.mktemp("check")
    proc = _torchrun(worker, "check", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _weights(out: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{name}-{rank}.safetensors"))


def test_two_ranks_hold_the_same_weights_of_their_own(two_ranks: Path) -> None:
    for name in ("plain", "fancy"):  # fancy: batch norm, dropout, crop-flip, PGD adversarial training
        assert _same(_weights(two_ranks, name, 0), _weights(two_ranks, name, 1)), name
    for rank in (0, 1):
        info = json.loads((two_ranks / f"info-{rank}.json").read_text())
        assert info["world"] == 2
        assert info["warnings"] == []  # no rank's weights differed before rank 0's were broadcast


def _halves_in_one_process(worker: ModuleType) -> dict[str, torch.Tensor]:
    """What two ranks should compute, simulated in one process: per batch, each half's mean-loss
    gradient weighted by its share of the batch, the two summed (rank 0's half of the last batch
    of 1 point is empty)."""
    ds, cfg = worker.dataset(), worker.PLAIN
    model = worker.model(False)
    opt = make_optimizer(model, cfg)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch)))
        for b in range(0, len(ds), cfg.batch_size):
            idx = perm[b : b + cfg.batch_size]
            total = [torch.zeros_like(p) for p in model.parameters()]
            for r in (0, 1):
                part = idx[Ranks(r, 2).share(len(idx))]
                if len(part):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(ds.x[part]), ds.y[part]).backward()
                    share = len(part) / len(idx)
                    total = [t + p.grad * share for t, p in zip(total, model.parameters(), strict=True)]
            for p, g in zip(model.parameters(), total, strict=True):
                p.grad = g
            opt.step()
    return model.state_dict()


def test_two_processes_compute_the_batch_gradient(worker: ModuleType, two_ranks: Path) -> None:
    """Two gloo ranks give, bit for bit, the weights of the half-batch simulation, and to 1e-5
    those of one process at the same global batch (the same gradient up to the order of sums)."""
    two = _weights(two_ranks, "plain", 0)
    assert _same(two, _halves_in_one_process(worker))
    one = worker.model(False)
    train(one, worker.dataset(), worker.PLAIN, progress=False)
    start = worker.model(False).state_dict()
    for k, v in one.state_dict().items():
        assert not torch.equal(v, start[k]) or k in ("mean", "std"), k  # training moved the weights
        assert torch.allclose(two[k], v, atol=1e-5, rtol=0), (k, float((two[k] - v).abs().max()))


def test_adversarial_examples_are_crafted_per_rank_on_its_shard(two_ranks: Path) -> None:
    points = [json.loads((two_ranks / f"info-{r}.json").read_text())["points"] for r in (0, 1)]
    epochs, n = 2, 129
    assert sum(points) == epochs * n  # every point crafted once per epoch, by one rank
    assert all(abs(p - epochs * n / 2) <= epochs * 5 for p in points), points  # half each (+-1 per batch)


def test_stopped_and_resumed_two_process_run_ends_with_the_same_weights(two_ranks: Path) -> None:
    for rank in (0, 1):
        assert json.loads((two_ranks / f"info-{rank}.json").read_text())["resumed_from"] == 1
        assert _same(_weights(two_ranks, "straight", rank), _weights(two_ranks, "resumed", rank))
    straight, resumed = (load_file(str(two_ranks / d / "final" / "model.safetensors")) for d in ("straight", "stopped"))
    assert _same(straight, resumed)  # what rank 0 wrote
    assert not any(two_ranks.glob("straight/checkpoints/.*tmp*"))


@pytest.mark.slow
def test_sigkilled_two_process_run_resumes_to_the_same_weights(worker: ModuleType, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _torchrun(worker, "kill", str(straight), "0").returncode == 0
    proc = _torchrun(worker, "kill", str(killed), "1")
    assert proc.returncode != 0  # rank 0 SIGKILLed itself after epoch 1's checkpoint; torchrun stopped rank 1
    assert json.loads((killed / "latest.json").read_text())["epoch"] == 1
    assert not (killed / "final").exists()
    assert _torchrun(worker, "kill", str(killed), "0").returncode == 0
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (straight, killed))
    assert _same(a, b)


def test_one_process_path_is_the_plain_loop(worker: ModuleType) -> None:
    """With one process, ``train`` is the loop it always was: the same weights, bit for bit, as
    a hand-written loop over the epoch order seeded from ``(seed, epoch)``."""
    ds, cfg = worker.dataset(), worker.PLAIN
    ref = worker.model(False)
    opt = make_optimizer(ref, cfg)
    for epoch in range(cfg.epochs):
        seed = _epoch_seed(cfg.seed, epoch)
        torch.manual_seed(seed)
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
        for b in range(0, len(ds), cfg.batch_size):
            idx = perm[b : b + cfg.batch_size]
            loss = F.cross_entropy(ref(ds.x[idx]), ds.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for ranks in (None, Ranks()):
        m = worker.model(False)
        train(m, ds, cfg, progress=False, ranks=ranks)
        assert _same(m.state_dict(), ref.state_dict())


def test_crop_flip_from_whole_batch_draws_matches_drawing_itself() -> None:
    x = torch.rand(6, 3, 8, 8)
    a = crop_flip(x, 2, torch.Generator().manual_seed(1))
    off, flip = draw_crop_flip(6, 2, torch.Generator().manual_seed(1))
    parts = [crop_flip(x[s], 2, draws=(off[s], flip[s])) for s in (slice(0, 3), slice(3, 6))]
    assert torch.equal(torch.cat(parts), a)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_split_a_batch_in_order(world: int) -> None:
    for n in (0, 1, 5, 32, 129):
        parts = [list(range(n))[Ranks(r, world).share(n)] for r in range(world)]
        assert sum(parts, []) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_rank_seeds_differ_and_rank_0_keeps_the_seed() -> None:
    seeds = [Ranks(r, 4).rank_seed(123) for r in range(4)]
    assert seeds[0] == 123 and len(set(seeds)) == 4


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_bad_nproc_names_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match="nproc="):
        check_nproc(bad)  # type: ignore[arg-type]


def test_cli_refuses_bad_nproc_and_population_defenses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--dataset", "digits", "--model", "lenet5", "--out", str(tmp_path)]
    assert main([*base, "--nproc", "0"]) == 2
    assert "nproc=0 must be an integer >= 1" in capsys.readouterr().err
    assert main([*base, "--defense", "ulm", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "--defense ulm" in err and "cannot train data-parallel" in err
    assert not any(tmp_path.iterdir())  # nothing launched, nothing written


def test_nproc_must_match_torchruns_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    assert from_env(None) == Ranks(1, 2, 1) == from_env(2)
    with pytest.raises(ConfigError, match="nproc=3 but torchrun launched 2"):
        from_env(3)
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ConfigError, match="RANK='two'"):
        from_env(None)


def test_workers_parse_the_same_command_line() -> None:
    argv = ["-v", "train", "--dataset", "mnist", "--model", "lenet5", "--out", "runs/x", "--lr", "0.05",
            "--set", "augment=none", "--set", "seed=2", "-q", "--defense", "pgd-at", "--defense-param", "eps=0.1",
            "--fraction", "0.2", "--nproc", "2"]
    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(_worker_argv(args))
    assert "--nproc" not in _worker_argv(args)
    assert {**vars(again), "nproc": 2} == vars(args)
