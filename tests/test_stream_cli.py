"""`bastion train --data DIR` and `bastion audit --data DIR` on an image folder read batch by
batch: the weights, test accuracy and audit rows of the same folder read into memory; a lazy
set never loaded whole (adversarial training, data-parallel shards, the final test accuracy);
flags and defenses that cannot apply refused with the reason."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bastion import data
from bastion.cli import main
from bastion.cli import train as train_cli
from bastion.data.lazy import LazyImages
from bastion.errors import ConfigError
from bastion.train.distributed import Ranks
from bastion.train.trainer import _epoch_pixels


def _png_folder(root: Path, per_class: int, seed: int) -> Path:
    """3 classes of ``per_class`` 8x8 grey PNGs whose brightness depends on the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.integers(0, 90, (8, 8)) + 80 * c, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("folders")
    return _png_folder(base / "train", 10, 0), _png_folder(base / "test", 4, 1)


def _no_load(self: LazyImages) -> torch.Tensor:
    raise AssertionError(f"{self!r} was read whole")


def _train_argv(train_dir: Path, test_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(train_dir), "--test-data", str(test_dir), "--channels", "1", "--resize", "28",
            "--model", "lenet5", "--epochs", "2", "--batch-size", "8", "--optimizer", "adam", "--lr", "0.01",
            "--val-fraction", "0.2", "--fraction", "0.9", "--subset-seed", "3", "--device", "cpu", "-q",
            "--defense", "pgd-at", "--defense-param", "eps=0.1", "--defense-param", "attack_params={steps=2}",
            "--out", str(out), *extra]


def test_train_on_a_streamed_folder_gives_the_in_memory_weights(folders: tuple[Path, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """PGD adversarial training with a validation split and a --fraction subset: the streamed
    folder (decoded by a worker, never loaded whole, test set included) ends with the weights and
    the test accuracy of the folder read into memory."""
    train_dir, test_dir = folders
    seen: dict[str, Any] = {}
    real = train_cli._train_data

    def spy(args: Any) -> Any:
        ds, meta = real(args)
        seen[args.stream] = ds
        return ds, meta

    monkeypatch.setattr(train_cli, "_train_data", spy)
    lines = {}
    for stream in ("off", "on"):
        with monkeypatch.context() as m:
            if stream == "on":
                m.setattr(LazyImages, "load", _no_load)
            assert main(_train_argv(train_dir, test_dir, tmp_path / stream, "--stream", stream,
                                    "--num-workers", "1" if stream == "on" else "0")) == 0
        lines[stream] = capsys.readouterr().out.splitlines()
    assert isinstance(seen["on"].x, LazyImages) and not isinstance(seen["off"].x, LazyImages)
    assert seen["on"].split == "train" and len(seen["on"]) == 27  # 0.9 of 30 points
    on, off = (load_file(str(tmp_path / s / "final" / "model.safetensors")) for s in ("on", "off"))
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    def timeless(out: list[str]) -> list[str]:  # epoch lines without their seconds, the last without its path
        return [re.sub(r"\(\d+\.\ds\)", "", ln.split("->")[0]) for ln in out]

    assert timeless(lines["on"]) == timeless(lines["off"]) and len(lines["on"]) == 3
    assert all("val acc" in ln for ln in lines["on"][:2])
    assert lines["on"][-1].startswith("test accuracy: ") and "%" in lines["on"][-1]
    meta = json.loads((tmp_path / "on" / "final" / "meta.json").read_text())
    plan = data.plan_image_folder(train_dir, channels=1, resize=28)
    assert meta["image_folder"]["points_sha256"] == plan.points_sha256 and meta["image_folder"]["fraction"] == 0.9
    assert meta["dataset"]["train_size"] + meta["dataset"]["val_size"] == 27


def test_without_test_data_no_test_accuracy_is_claimed(folders: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--data", str(folders[0]), "--channels", "1", "--resize", "28", "--model", "lenet5",
            "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.2", "--device", "cpu", "-q", "--stream", "on",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "test accuracy: not measured (no --test-data DIR" in last and "not a test accuracy" in last
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def _lines(tensors: list[torch.Tensor]) -> list[list[int]]:
    return [t.flatten(1)[:, 0].mul(255).round().long().tolist() for t in tensors]


@pytest.mark.parametrize(("n", "batch", "world"), [(30, 8, 2), (30, 8, 3), (9, 2, 3)])
def test_each_rank_reads_only_its_shard_of_a_lazy_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int,
                                                      batch: int, world: int) -> None:
    """Data-parallel training on a lazy set: rank r reads exactly its part of every batch, once,
    and the parts put together are the batches of the in-memory set (also when a batch has fewer
    points than there are ranks)."""
    from PIL import Image

    for i in range(n):  # image i is the constant i, so a batch says which images it holds
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.fromarray(np.full((2, 2), i, np.uint8)).save(tmp_path / "a" / f"{i:03d}.png")
    lazy = data.open_image_folder(tmp_path, stream=True)
    memory = data.open_image_folder(tmp_path, stream=False)
    read: list[int] = []
    source = type(lazy.x.source)
    get = source.__getitem__
    monkeypatch.setattr(source, "__getitem__", lambda self, i: read.append(int(i)) or get(self, i))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    parts = []
    for rank in range(world):
        read.clear()
        loop = SimpleNamespace(train_set=lazy, config=SimpleNamespace(batch_size=batch), ranks=Ranks(rank, world))
        parts.append(_lines(list(_epoch_pixels(loop, perm))))  # type: ignore[arg-type]
        mine = [int(i) for s in range(0, n, batch) for i in perm[s : s + batch][Ranks(rank, world).share(
            len(perm[s : s + batch]))]]
        assert sorted(read) == sorted(mine), f"rank {rank} read images outside its shard"
    single = SimpleNamespace(train_set=memory, config=SimpleNamespace(batch_size=batch), ranks=Ranks())
    whole = _lines(list(_epoch_pixels(single, perm)))  # type: ignore[arg-type]
    assert [sum((p[b] for p in parts), []) for b in range(len(whole))] == whole == \
        [perm[s : s + batch].tolist() for s in range(0, n, batch)]


def test_folder_flags_and_defenses_that_cannot_apply_are_refused(folders: tuple[Path, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    train_dir, test_dir = folders
    base = ["train", "--model", "lenet5", "--device", "cpu", "-q", "--epochs", "1", "--out", str(tmp_path / "x")]
    assert main([*base, "--dataset", "digits", "--stream", "on", "--num-workers", "2"]) == 2
    assert "--num-workers 2, --stream on: these flags read an image folder (--data DIR), but the data come " \
           "from --dataset digits" in capsys.readouterr().err
    assert main([*base, "--dataset", "digits", "--test-data", str(test_dir)]) == 2
    assert "--test-data" in capsys.readouterr().err
    (tmp_path / "other" / "zz").mkdir(parents=True)
    (tmp_path / "other" / "zz" / "00.png").write_bytes((test_dir / "c0" / "00.png").read_bytes())
    assert main([*base, "--data", str(train_dir), "--test-data", str(tmp_path / "other"), "--resize", "28"]) == 2
    assert "has the classes ['zz'], but --data" in capsys.readouterr().err
    folder_argv = [*base, "--data", str(train_dir), "--channels", "1", "--resize", "28", "--stream", "on"]
    assert main([*folder_argv, "--defense", "bagging-noise"]) == 2  # its noise is drawn for the whole set
    err = capsys.readouterr().err
    assert "--defense bagging-noise needs every image of --data" in err and "pass --stream off" in err
    with pytest.raises(ConfigError, match=r"data='.*points.npz' is a file of arrays, not an image folder; "
                                          r"num_workers=2 apply only to a folder"):
        np.savez(tmp_path / "points.npz", x=np.zeros((2, 1, 2, 2), np.float32), y=np.zeros(2, np.int64))
        data.from_path(tmp_path / "points.npz", num_workers=2)


def _audit_rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as con:
        return sorted(con.execute("SELECT config_hash, attack_label, eps, n, clean_accuracy, robust_accuracy, "
                                  "per_sample, gradients, forwards FROM evaluations"))


def test_audit_of_a_streamed_folder_gives_the_in_memory_rows(folders: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "net.py").write_text("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
                                     "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n")
    opened: dict[str, Any] = {}
    real = data.from_path

    def spy(path: Any, **kw: Any) -> Any:
        opened[kw["stream"]] = ds = real(path, **kw)
        return ds

    monkeypatch.setattr(data, "from_path", spy)
    rows = {}
    for stream in ("on", "off"):
        argv = ["audit", "--model", f"{tmp_path / 'net.py'}:build", "--data", str(folders[0]), "-n", "12",
                "--eps", "0.1", "--attacks", "fgsm", "--no-autoattack", "--stream", stream,
                "--out", str(tmp_path / stream)]
        with monkeypatch.context() as m:
            if stream == "on":
                m.setattr(LazyImages, "load", _no_load)
            assert main(argv) == 0
        assert "fgsm" in capsys.readouterr().out
        rows[stream] = _audit_rows(tmp_path / stream / "results.sqlite")
    assert isinstance(opened[True].x, LazyImages) and not isinstance(opened[False].x, LazyImages)
    assert rows["on"] == rows["off"] and len(rows["on"]) == 2  # fgsm and the worst case
    assert rows["on"][0][3] == 12


def test_mra_crafting_on_a_lazy_set_reads_each_batch_once(folders: tuple[Path, Path]) -> None:
    """expected_output_attack on a lazily read set: the adversarial points are allocated, not
    copied from x (which a lazy x refuses), and the outcome is the in-memory one."""
    from torch import nn

    from bastion import attacks
    from bastion.eval.mra import expected_output_attack
    from bastion.models.random import Population
    from bastion.models.user import wrap

    def member(seed: int) -> Any:
        torch.manual_seed(seed)
        return wrap(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), input_shape=(1, 8, 8), num_classes=3).eval()

    pop = Population([member(0), member(1)]).eval()
    atk = attacks.create("fgsm", eps=0.1)
    out = [expected_output_attack(pop, data.open_image_folder(folders[0], stream=s), atk, k=3, seed=0, batch_size=8)
           for s in (True, False)]
    for o in out:
        o.pop("seconds")
    assert out[0] == out[1] and out[0]["n"] == 30
