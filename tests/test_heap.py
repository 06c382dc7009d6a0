"""Giving the free heap back while streaming (bastion.utils.heap): how often it looks, that it
releases only a large free heap, that glibc's calls are found, and that a streamed read looks
once per batch."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from bastion import data
from bastion.utils import heap


def test_releasing_calls_the_release_before_every_nth_item(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    items: list[int] = []

    def record() -> bool:
        calls.append(len(items))  # how many items had been handed out when it was called
        return True

    monkeypatch.setattr(heap, "release_if_grown", record)
    for every, expected in ((1, [0, 1, 2, 3, 4, 5, 6]), (3, [0, 3, 6]), (0, [])):
        calls.clear()
        items.clear()
        for i in heap.releasing(range(7), every=every):
            items.append(i)
        assert items == list(range(7))
        assert calls == expected, every


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibc_release_is_found_and_runs() -> None:
    assert heap.release_free_heap() is True
    assert isinstance(heap.resident_bytes(), int)


def test_the_heap_is_released_only_after_the_resident_memory_grew(monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[int] = []
    rss = [100]
    monkeypatch.setattr(heap, "release_free_heap", lambda: released.append(1) or True)
    monkeypatch.setattr(heap, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(heap, "_after_last", [None])
    assert heap.release_if_grown(50) and len(released) == 1  # the first look releases
    rss[0] = 140
    assert not heap.release_if_grown(50) and len(released) == 1  # grown 40 <= 50
    rss[0] = 160
    assert heap.release_if_grown(50) and len(released) == 2  # grown 60 > 50: released, new baseline 160
    rss[0] = 200
    assert not heap.release_if_grown(50)
    monkeypatch.setattr(heap, "resident_bytes", lambda: None)
    assert heap.release_if_grown(50) and len(released) == 3  # cannot tell: releases


@pytest.mark.parametrize("workers", [0, 1])
def test_a_streamed_read_releases_once_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 workers: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(10):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / f"c{i % 2}" / f"{i}.png")
    ds = data.open_image_folder(tmp_path, stream=True, num_workers=workers)
    calls: list[int] = []
    monkeypatch.setattr(heap, "release_if_grown", lambda: calls.append(1) or True)
    batches = list(ds.x.batches(batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert len(calls) == 4
    assert torch.equal(torch.cat(batches), data.from_image_folder(tmp_path).x)
