"""Image folders read lazily (bastion.data.stream, bastion.data.lazy): the same tensors as the
in-memory reader, a fixed hashed subset, DataLoader workers, the batch loop and training on a
lazy set, and errors that name what is wrong."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bastion import attacks, data
from bastion.data import stream
from bastion.data.lazy import LazyImages, NeedsEveryImageError
from bastion.errors import ConfigError, DataIntegrityError, DatasetNotFoundError, InputError
from bastion.eval.loop import measure
from bastion.eval.robust import evaluate
from bastion.eval.threats import EngineVerdict
from bastion.models.user import wrap
from bastion.train.config import TrainConfig
from bastion.train.trainer import train

CLASSES, PER_CLASS, HW = ("cat", "dog", "emu"), 12, (8, 6)


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of 12 random 8x6 RGB PNGs (a few more in one class), plus a file that is no image."""
    root = tmp_path_factory.mktemp("stream") / "val"
    rng = np.random.default_rng(0)
    for c in CLASSES:
        for i in range(PER_CLASS + (3 if c == "emu" else 0)):
            _png(root / c / f"{i:03d}.png", rng.integers(0, 256, (*HW, 3), dtype=np.uint8))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def reference(folder: Path) -> data.ImageDataset:
    return data.from_image_folder(folder)


def test_a_lazy_folder_gives_the_tensors_of_the_in_memory_reader(folder: Path, reference: data.ImageDataset) -> None:
    lazy = data.open_image_folder(folder, stream=True)
    n = len(reference)
    assert isinstance(lazy.x, LazyImages) and isinstance(lazy.x, torch.Tensor)
    assert len(lazy) == n and lazy.x.shape == reference.x.shape and lazy.shape == (3, *HW)
    assert torch.equal(lazy.x[0:n], reference.x), "pixels / 255 in float32, in the folder's order"
    assert torch.equal(lazy.y, reference.y) and lazy.classes == reference.classes == CLASSES
    assert lazy.mean == pytest.approx(reference.mean, abs=1e-12) and lazy.std == pytest.approx(reference.std, abs=1e-12)

    memory = data.open_image_folder(folder, stream=False)
    assert not isinstance(memory.x, LazyImages) and torch.equal(memory.x, reference.x)
    assert (memory.mean, memory.std, memory.source) == (lazy.mean, lazy.std, lazy.source)
    assert not isinstance(data.open_image_folder(folder).x, LazyImages), "a small set stays in memory by default"


def test_the_size_threshold_decides_when_nothing_is_forced(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = data.plan_image_folder(folder)
    assert plan.nbytes == len(plan) * 3 * 8 * 6 * 4
    monkeypatch.setattr(stream, "STREAM_ABOVE_BYTES", plan.nbytes - 1)
    assert isinstance(plan.dataset().x, LazyImages)
    monkeypatch.setattr(stream, "STREAM_ABOVE_BYTES", plan.nbytes)
    assert not isinstance(plan.dataset().x, LazyImages)


@pytest.mark.parametrize("workers", [0, 2])
def test_slices_and_selections_read_the_right_points(folder: Path, reference: data.ImageDataset, workers: int) -> None:
    x, ref = data.open_image_folder(folder, stream=True, num_workers=workers).x, reference.x
    n = len(ref)
    assert torch.equal(torch.cat([x[i : i + 8] for i in range(0, n, 8)]), ref), "the batch loop's pattern"
    assert torch.equal(x[5:9], ref[5:9]) and torch.equal(x[0:4], ref[0:4]), "out of order: a new pass"
    assert torch.equal(torch.cat([x[i : i + 8] for i in range(16, n, 8)]), ref[16:]), "a resumed loop"
    assert torch.equal(x[3], ref[3]) and torch.equal(x[-1], ref[-1]) and x[7:7].shape == (0, 3, *HW)
    idx, mask = torch.tensor([30, 2, 2, 11]), torch.arange(n) % 3 == 1
    assert torch.equal(x[idx], ref[idx]) and torch.equal(x[mask], ref[mask]) and torch.equal(x[::4], ref[::4])
    view = x.rows(idx)
    assert isinstance(view, LazyImages) and torch.equal(view[0:4], ref[idx])
    assert x.to("cpu") is x and isinstance(x.to("meta"), LazyImages) and x.to("meta").device.type == "meta"
    assert torch.equal(torch.cat(list(x.batches(torch.arange(n).flip(0), 10))), ref.flip(0))
    with pytest.raises(IndexError):
        x[n]


def test_dataset_methods_stay_lazy(folder: Path, reference: data.ImageDataset) -> None:
    lazy = data.open_image_folder(folder, stream=True)
    for got, want in ((lazy.take(7), reference.take(7)), (lazy.subset(0.5, seed=2), reference.subset(0.5, seed=2)),
                      (lazy.split_off(0.25, seed=1)[1], reference.split_off(0.25, seed=1)[1])):
        assert isinstance(got.x, LazyImages)
        assert torch.equal(got.x[0 : len(got)], want.x) and torch.equal(got.y, want.y)


def test_the_hashed_subset_is_fixed_by_the_names_and_the_seed(folder: Path) -> None:
    a, b = data.plan_image_folder(folder, samples=10, seed=3), data.plan_image_folder(folder, samples=10, seed=3)
    assert a.files == b.files and a.points_sha256 == b.points_sha256 and len(a) == 10
    other = data.plan_image_folder(folder, samples=10, seed=4)
    assert other.files != a.files and other.points_sha256 != a.points_sha256
    assert other.list_sha256 == a.list_sha256, "the same folder"
    whole = data.plan_image_folder(folder)
    order = {f: i for i, f in enumerate(whole.files)}
    assert [order[f] for f in a.files] == sorted(order[f] for f in a.files), "kept in the folder's order"
    assert all(int(lab) == CLASSES.index(f.split("/")[0]) for f, lab in zip(a.files, a.labels, strict=True))
    assert set(data.plan_image_folder(folder, samples=4, seed=3).files) <= set(a.files), "more samples, a superset"
    names = list(whole.files)
    shuffled = [names[i] for i in np.random.default_rng(1).permutation(len(names))]
    picked = {shuffled[i] for i in stream.hashed_subset(shuffled, 10, 3)}
    assert picked == set(a.files), "the listing order does not matter"
    m = a.manifest()
    assert (m["samples"], m["seed"], m["points"], m["files"]) == (10, 3, 10, len(names))
    assert m["points_sha256"] in data.open_image_folder(folder, samples=10, seed=3).source


def test_the_digest_changes_when_a_chosen_file_changes(tmp_path: Path, folder: Path) -> None:
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = data.plan_image_folder(copy, samples=5, seed=0)
    assert before.points_sha256 == data.plan_image_folder(folder, samples=5, seed=0).points_sha256, "path-free"
    _png(copy / before.files[0], np.zeros((*HW, 3), np.uint8))
    assert data.plan_image_folder(copy, samples=5, seed=0).points_sha256 != before.points_sha256


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 6, 16), nn.ReLU(), nn.Linear(16, 3))
    return wrap(net, input_shape=(3, *HW), num_classes=3).eval()


@pytest.mark.parametrize("workers", [0, 2])
def test_the_batch_loop_gives_the_outcomes_of_the_in_memory_set(folder: Path, reference: data.ImageDataset,
                                                                 workers: int) -> None:
    lazy = data.open_image_folder(folder, stream=True, num_workers=workers)
    model, cpu = _tiny_model(), torch.device("cpu")
    threat = EngineVerdict(model, attacks.create("fgsm", eps=0.05))
    got = measure(threat, lazy.x, lazy.y, batch_size=8, seed=1, device=cpu)
    want = measure(threat, reference.x, reference.y, batch_size=8, seed=1, device=cpu)
    assert torch.equal(got.robust, want.robust) and got.gradients == want.gradients
    assert 0 < int(want.robust.sum()) < len(reference), "the check can fail both ways"
    rep_lazy = evaluate(model, lazy, [attacks.create("fgsm", eps=0.05)], batch_size=8, progress=False)
    rep_mem = evaluate(model, reference, [attacks.create("fgsm", eps=0.05)], batch_size=8, progress=False)
    def timeless(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert rep_lazy.clean_accuracy == rep_mem.clean_accuracy and timeless(rep_lazy.rows) == timeless(rep_mem.rows)


def test_training_on_a_lazy_set_ends_with_the_weights_of_the_in_memory_one(folder: Path,
                                                                           reference: data.ImageDataset) -> None:
    lazy = data.open_image_folder(folder, stream=True)
    config = TrainConfig(epochs=2, batch_size=8, optimizer="adam", lr=1e-2, weight_decay=0.0, val_fraction=0.2,
                         device="cpu")
    weights = []
    for ds in (lazy, reference):
        model = _tiny_model()
        train(model, ds, config, progress=False)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))
    for (xa, ya), (xb, yb) in zip(data.iter_batches(lazy, order, 8), data.iter_batches(reference, order, 8),
                                  strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_what_needs_every_image_fails_and_says_what_to_do(folder: Path, reference: data.ImageDataset) -> None:
    x = data.open_image_folder(folder, stream=True).x
    for op in (lambda: torch.cat([x]), lambda: x.clone(), lambda: x + 1, lambda: x.numpy(), lambda: x.max()):
        with pytest.raises(NeedsEveryImageError, match="needs every image at once.*load"):
            op()
    with pytest.raises(InputError, match="float32"):
        x.to(torch.float64)
    with pytest.raises(InputError, match="index the points only"):
        x[:, 0]
    assert torch.equal(x.load(), reference.x), "reading everything is asked for by name"
    again = pickle.loads(pickle.dumps(x))
    assert isinstance(again, LazyImages) and torch.equal(again[0:5], reference.x[:5])


def test_resize_crop_and_channels(tmp_path: Path) -> None:
    from PIL import Image
    rng = np.random.default_rng(2)
    shapes = {"a": [(10, 14, 3), (12, 12, 3)], "b": [(16, 9, 3)]}
    for c, items in shapes.items():
        for i, s in enumerate(items):
            _png(tmp_path / c / f"{i}.png", rng.integers(0, 256, s, dtype=np.uint8))
    with pytest.raises(DataIntegrityError, match=r"b/0.png: image is 16x9 .*/a/0.png is 10x14.*crop="):
        data.plan_image_folder(tmp_path)
    ds = data.open_image_folder(tmp_path, resize=9, crop=(8, 7), stream=True)
    assert ds.x.shape == (3, 3, 8, 7)
    img = Image.open(tmp_path / "b" / "0.png").resize((9, 16), Image.Resampling.BILINEAR)  # 9x16 already
    want = np.asarray(img.crop((1, 4, 8, 12)), dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    assert torch.equal(ds.x[1], torch.from_numpy(want)), "points interleaved by class: a/0, b/0, a/1"
    img = Image.open(tmp_path / "a" / "0.png").resize((12, 9), Image.Resampling.BILINEAR)  # 14x10 -> 12x9
    want = np.asarray(img.crop((2, 0, 9, 8)), dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    assert torch.equal(ds.x[0], torch.from_numpy(want))
    grey = data.open_image_folder(tmp_path, channels=1, crop=9, stream=True)
    assert grey.x.shape == (3, 1, 9, 9) and len(grey.mean) == 1
    with pytest.raises(DataIntegrityError, match=r"smaller than crop=\(12, 12\)"):
        data.open_image_folder(tmp_path, crop=12, stream=True)


def test_errors_name_the_bad_field_and_value(tmp_path: Path, folder: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="path=.*empty.* has no class folders"):
        data.open_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DatasetNotFoundError, match="path=.*no images"):
        data.open_image_folder(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="nowhere.* is not a folder"):
        data.open_image_folder(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"samples=100 is larger than the 39 images"):
        data.plan_image_folder(folder, samples=100)
    bad_options = ({"samples": -1}, {"seed": 1.5}, {"channels": 2}, {"resize": 0}, {"crop": (4, 0)},
                   {"num_workers": -1}, {"stream": "yes"})
    for bad in bad_options:
        (key, value), = bad.items()
        with pytest.raises(ConfigError, match=f"{key}={value!r}".replace("(", r"\(").replace(")", r"\)")):
            data.open_image_folder(folder, **bad)  # type: ignore[arg-type]

    broken = tmp_path / "broken"
    _png(broken / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    (broken / "a" / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataIntegrityError, match=r"a/1.jpg: cannot open image"):
        data.plan_image_folder(broken)
    stats = {"mean": (0.5,) * 3, "std": (0.25,) * 3}  # no image is read to compute them
    lazy = data.open_image_folder(broken, headers=False, stream=True, **stats)  # found only when read
    assert torch.equal(lazy.x[0], torch.zeros(3, 4, 4))
    with pytest.raises(DataIntegrityError, match=r"a/1.jpg: cannot decode image"):
        lazy.x[0:2]
    with pytest.raises(DataIntegrityError, match=r"a/1.jpg: cannot decode image"):
        data.open_image_folder(broken, headers=False, stream=True, num_workers=1, **stats).x[0:2]
    _png(tmp_path / "modes" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / "modes" / "b" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataIntegrityError, match=r"b/0.png: image is 4x4 with 1 channel.*channels="):
        data.plan_image_folder(tmp_path / "modes")
    assert data.open_image_folder(tmp_path / "modes", channels=3).x.shape == (2, 3, 4, 4)
