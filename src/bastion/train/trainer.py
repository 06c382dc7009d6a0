"""The training loop: one loop for every objective.

Determinism and resumption work at epoch granularity: epoch ``e`` draws its shuffling,
augmentation and dropout from seeds derived from ``(config.seed, e)`` alone, and a checkpoint
(weights, optimiser state, metrics) is written after every epoch. A run killed at any point
resumes from its last finished epoch and ends with the same weights as an uninterrupted run.
Data-parallel training (``ranks``, :mod:`bastion.train.distributed`) keeps these semantics: every
rank draws the same epoch order, trains on its part of each batch, and rank 0 alone writes.

Run directory layout (``out_dir``)::

    latest.json                 {"epoch": e, "best": e*}  (written atomically, last)
    checkpoints/epoch-NNN/      the checkpoint after epoch NNN (latest and best are kept)
    final/                      the final model (best on validation when early stopping)

:func:`bastion.train.checkpoint.resolve` turns a run directory into its ``final/`` (or latest
epoch) checkpoint, so commands take either.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.config import to_dict
from bastion.data.base import ImageDataset
from bastion.data.stream import iter_batches
from bastion.errors import CheckpointError, ConfigError
from bastion.models.compiled import speed_up
from bastion.models.predict import accuracy
from bastion.train.augment import crop_flip, draw_crop_flip
from bastion.train.checkpoint import (
    load_optimizer,
    load_weights,
    read_meta,
    save_checkpoint,
)
from bastion.train.config import TrainConfig
from bastion.train.distributed import SINGLE, Ranks
from bastion.train.objectives import CrossEntropy, Objective
from bastion.utils.io import atomic_write_json
from bastion.utils.progress import bar as progress_bar

log = logging.getLogger(__name__)

#: config fields a resumed run may change: how long it goes on, where and how fast it runs
_MAY_CHANGE_ON_RESUME = ("epochs", "device", "compile", "channels_last")


@dataclass
class EpochRecord:
    """Metrics of one epoch."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_acc: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model and the run's history."""

    model: nn.Module
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    out_dir: Path | None = None


#: the cyclic schedule's peak, as a fraction of training (Wong, Rice & Kolter 2020: 2/5). Not
#: rounded to whole epochs; their MNIST code floors ``epochs * 2 / 5`` (the same peak at 5 or 10 epochs)
CYCLE_PEAK = 0.4


def lr_at(config: TrainConfig, epoch: float) -> float:
    """Learning rate at ``epoch`` (0-based; fractional for the cyclic schedule, whose rate
    changes every step) under the configured schedule."""
    if config.schedule == "cyclic":
        peak = CYCLE_PEAK * config.epochs
        frac = epoch / peak if epoch <= peak else (config.epochs - epoch) / (config.epochs - peak)
        return config.lr * min(max(frac, 0.0), 1.0)
    if config.schedule == "step":
        return config.lr * config.gamma ** (epoch // config.step_size)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.lr


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def train(
    model: nn.Module,
    train_set: ImageDataset,
    config: TrainConfig | None = None,
    *,
    objective: Objective | None = None,
    val_set: ImageDataset | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    callbacks: Sequence[Callable[[EpochRecord], None]] = (),
    meta: dict[str, Any] | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_set``.

    Args:
        model: the model (usually from :func:`bastion.models.create`), trained in place.
        train_set: training data. With ``config.val_fraction > 0`` a validation split is held
            out of it (seeded), unless ``val_set`` is given. A lazily read set
            (:class:`~bastion.data.lazy.LazyImages` ``x``) is read batch by batch, ahead by its
            DataLoader workers, and gives the weights of the same set held in memory.
        config: hyper-parameters (defaults: :class:`TrainConfig`).
        objective: the loss of a batch (default: cross-entropy).
        out_dir: where checkpoints go; ``None`` trains without checkpoints.
        resume: continue from the last finished epoch in ``out_dir`` if there is one.
        progress: show a progress bar per epoch.
        callbacks: called with each epoch's :class:`EpochRecord` after its checkpoint is written.
        meta: extra metadata stored in every checkpoint (e.g. the dataset name).
        ranks: this process's place in a data-parallel run (:func:`bastion.train.distributed.session`);
            ``None``: one process.
    """
    config = config or TrainConfig()
    objective = objective or CrossEntropy()
    ranks = ranks or SINGLE
    device = ranks.device(config.device)
    speed_up(model.to(device), compile=config.compile, channels_last=config.channels_last)
    if config.val_fraction and val_set is None:
        train_set, val_set = train_set.split_off(config.val_fraction, seed=config.seed)
    augment = config.augment == "crop-flip" or (config.augment == "auto" and train_set.shape == (3, 32, 32))
    optimizer = make_optimizer(model, config)
    run_meta = _run_meta(model, train_set, val_set, config, objective, meta)
    if ranks.world > 1:
        run_meta["data_parallel"] = {"world_size": ranks.world, "backend": ranks.backend}
    out = Path(out_dir) if out_dir is not None else None
    result = TrainResult(model=model, out_dir=out)
    start_epoch, best_acc, bad_epochs = _start(out if resume else None, model, optimizer, run_meta, result, ranks)
    if out is not None and (result.stopped_early or start_epoch >= config.epochs):
        _finish(out, model, run_meta, result, ranks)
        return result

    loop = _Loop(model, train_set, val_set, config, objective, optimizer, device, augment, progress, ranks)
    _fit(loop, result, start_epoch, best_acc, bad_epochs, out=out, run_meta=run_meta, callbacks=callbacks)
    if out is not None:
        _finish(out, model, run_meta, result, ranks)
    elif result.best_epoch is not None and config.patience:
        log.info(
            "early stopping without out_dir: the last epoch's weights are kept (best was epoch %d)", result.best_epoch
        )
    return result


def _run_meta(
    model: nn.Module, train_set: ImageDataset, val_set: ImageDataset | None, config: TrainConfig,
    objective: Objective, meta: dict[str, Any] | None,
) -> dict[str, Any]:
    """The metadata of the run, stored in every checkpoint (a resumed run must match it)."""
    return {
        "model": dict(getattr(model, "spec", {}) or {}),
        "config": to_dict(config),
        "objective": objective.describe(),
        "dataset": {"name": train_set.name, "train_size": len(train_set), "val_size": len(val_set) if val_set else 0},
        **(meta or {}),
    }


@dataclass
class _Loop:
    """What the epochs of one :func:`train` call share."""

    model: nn.Module
    train_set: ImageDataset
    val_set: ImageDataset | None
    config: TrainConfig
    objective: Objective
    optimizer: torch.optim.Optimizer
    device: torch.device
    augment: bool
    progress: bool
    ranks: Ranks = SINGLE


def _fit(
    loop: _Loop, result: TrainResult, start_epoch: int, best_acc: float, bad_epochs: int, *,
    out: Path | None, run_meta: dict[str, Any], callbacks: Sequence[Callable[[EpochRecord], None]],
) -> None:
    """The epochs from ``start_epoch`` on, with ``best_acc`` the best validation accuracy so far
    (-1 for none) and ``bad_epochs`` the epochs since it: each is recorded in ``result``, saved
    to ``out`` (unless ``None``) and passed to ``callbacks``, until the last epoch or an early stop."""
    config = loop.config
    step = start_epoch * math.ceil(len(loop.train_set) / config.batch_size)
    with progress_bar(total=config.epochs, initial=start_epoch, progress=loop.progress and loop.ranks.is_writer,
                      desc="training", unit="epoch") as epochs:  # counts epochs in a log, short ones too
        for epoch in range(start_epoch, config.epochs):
            rec, step = _run_epoch(loop, epoch, step)
            result.history.append(rec)
            val_acc = rec.val_acc
            if val_acc is not None and val_acc > best_acc:
                best_acc, bad_epochs, result.best_epoch = float(val_acc), 0, epoch + 1
            elif val_acc is not None:
                bad_epochs += 1
            stop = (bool(config.patience) and bad_epochs >= config.patience) or bool(rec.extra.get("stop"))
            result.stopped_early = stop
            if loop.ranks.is_writer:
                _log_epoch(rec, config.epochs)
            if out is not None and loop.ranks.is_writer:
                _save_epoch(out, loop.model, loop.optimizer, run_meta, result, best_acc, bad_epochs)
            if out is not None:
                loop.ranks.barrier()  # every rank's callbacks run once the checkpoint is written
            for cb in callbacks:
                cb(rec)
            epochs.set_postfix(loss=f"{rec.train_loss:.4f}", acc=f"{rec.train_acc:.4f}", refresh=False)
            epochs.update(1)
            if stop:
                break


def _run_epoch(loop: _Loop, epoch: int, step: int) -> tuple[EpochRecord, int]:
    """Train one epoch (0-based ``epoch``; ``step``: optimiser steps taken before it), its
    randomness seeded from ``(config.seed, epoch)`` alone. Returns its record and the step count
    after it."""
    config, model = loop.config, loop.model
    t0 = time.perf_counter()
    seed = _epoch_seed(config.seed, epoch)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(loop.ranks.rank_seed(seed))  # dropout and any other randomness inside the model
    _set_lr(loop.optimizer, lr_at(config, epoch))
    loop.objective.context.update(epoch=epoch, epochs=config.epochs, step=step, device=loop.device)
    loop.objective.start_epoch(model, epoch)
    model.train()
    perm = torch.randperm(len(loop.train_set), generator=gen)
    loss_sum, correct, seen, step = _train_batches(loop, epoch, perm, gen, step)
    loss_total, right, count = loop.ranks.total(loss_sum, correct, seen)  # over the ranks
    loop.ranks.average_buffers(model)
    extra = loop.objective.end_epoch(model, epoch)
    val_set = loop.val_set
    val_acc = None
    if val_set and loop.ranks.is_writer:
        val_acc = accuracy(model, val_set, batch_size=config.eval_batch_size, device=loop.device)
    extra, val_acc = loop.ranks.settle(model, (extra, val_acc))  # rank 0's weights and metrics
    seconds = time.perf_counter() - t0
    lr = float(loop.optimizer.param_groups[0]["lr"])  # the epoch's rate (cyclic: its last step's)
    rec = EpochRecord(epoch + 1, lr, loss_total / max(count, 1), right / max(count, 1), val_acc, seconds, extra)
    return rec, step


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _train_batches(
    loop: _Loop, epoch: int, perm: torch.Tensor, gen: torch.Generator, step: int
) -> tuple[float, int, int, int]:
    """One pass over the training set in the order ``perm`` (augmentation drawn from ``gen``),
    this rank training on its part of each batch: ``(loss summed over this rank's points, those
    classified right, points seen, step count after)``."""
    config, model, train_set = loop.config, loop.model, loop.train_set
    loss_sum, correct, seen = 0.0, 0, 0
    batches = math.ceil(len(train_set) / config.batch_size)
    bar = progress_bar(range(batches), progress=loop.progress and loop.ranks.is_writer,
                       desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, unit="batch")
    pixels = _epoch_pixels(loop, perm)
    for b in bar:
        idx = perm[b * config.batch_size : (b + 1) * config.batch_size]
        xb, yb = _batch(loop, idx, next(pixels), gen)
        if not len(yb):  # a rank's part is empty only when the batch has fewer points than ranks
            loop.optimizer.zero_grad(set_to_none=True)
        else:
            loss, logits = loop.objective(model, xb, yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {float(loss)} at epoch {epoch + 1}, batch {b}; lower lr={config.lr}"
                )
            loop.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        loop.ranks.reduce_grads(model, len(yb), len(idx))
        if config.schedule == "cyclic":  # the rate of the point in training this step reaches
            _set_lr(loop.optimizer, lr_at(config, epoch + (b + 1) / batches))
        loop.optimizer.step()
        loop.objective.after_step(model, step)
        step += 1
        if b % 20 == 0 and seen:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
    bar.close()
    return loss_sum, correct, seen, step


def _epoch_pixels(loop: _Loop, perm: torch.Tensor) -> Iterator[torch.Tensor]:
    """This rank's part of each batch of the epoch order ``perm``, in order, on the CPU: read
    ahead by the DataLoader workers of a lazily read set (:func:`bastion.data.iter_batches`;
    nothing else of the set is read), indexed as ``x[idx]`` in memory. Every full batch gives
    this rank a part of one size, so those parts are one ordered pass; the last, shorter batch
    is read on its own."""
    x, size, n = loop.train_set.x, loop.config.batch_size, len(perm)
    full = n - n % size
    part = loop.ranks.share(size)
    own = perm[:full].view(-1, size)[:, part].reshape(-1)
    width = part.stop - part.start
    if width:
        yield from (xb for xb, _ in iter_batches(loop.train_set, own, width))
    else:  # fewer points in a batch than ranks: this rank's parts are empty
        yield from (x[own[:0]] for _ in range(full // size))
    if full < n:
        last = perm[full:]
        yield x[last[loop.ranks.share(len(last))]]


def _batch(loop: _Loop, idx: torch.Tensor, xb: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the batch ``idx``, with its images ``xb`` (:func:`_epoch_pixels`), on
    the device; augmentation is drawn from ``gen`` for the whole batch, so every rank's generator
    stays in step and a point gets the draw it would get in one process."""
    part = loop.ranks.share(len(idx))
    if loop.augment:
        off, flip = draw_crop_flip(len(idx), loop.config.crop_padding, gen)
        xb = crop_flip(xb, loop.config.crop_padding, draws=(off[part], flip[part]))
    yb = loop.train_set.y[idx[part]]
    return xb.to(loop.device, non_blocking=True), yb.to(loop.device, non_blocking=True)


def _log_epoch(rec: EpochRecord, epochs: int) -> None:
    log.info(
        "epoch %d/%d lr %.4g loss %.4f acc %.4f%s (%.1fs)",
        rec.epoch, epochs, rec.lr, rec.train_loss, rec.train_acc,
        f" val {rec.val_acc:.4f}" if rec.val_acc is not None else "", rec.seconds,
    )


def _epoch_dir(out: Path, epoch: int) -> Path:
    return out / "checkpoints" / f"epoch-{epoch:03d}"


def _save_epoch(
    out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, run_meta: dict[str, Any],
    result: TrainResult, best_acc: float, bad_epochs: int,
) -> None:
    epoch = result.history[-1].epoch
    meta = {
        **run_meta,
        "epoch": epoch,
        "history": [asdict(r) for r in result.history],
        "best_epoch": result.best_epoch,
        "best_val_acc": best_acc if best_acc >= 0 else None,
        "bad_epochs": bad_epochs,
        "stopped_early": result.stopped_early,
    }
    save_checkpoint(_epoch_dir(out, epoch), model, meta, optimizer)
    atomic_write_json(out / "latest.json", {"epoch": epoch, "best": result.best_epoch})
    keep = {f"epoch-{epoch:03d}"} | ({f"epoch-{result.best_epoch:03d}"} if result.best_epoch else set())
    for d in (out / "checkpoints").iterdir():
        if d.is_dir() and d.name.startswith("epoch-") and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def _resume(
    out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, run_meta: dict[str, Any], result: TrainResult
) -> tuple[int, float, int]:
    try:
        latest = json.loads((out / "latest.json").read_text(encoding="utf-8"))
        epoch = int(latest["epoch"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{out / 'latest.json'}: corrupted ({e}); delete it to start afresh") from None
    path = _epoch_dir(out, epoch)
    meta = read_meta(path)
    for key in ("model", "config", "objective"):
        old, new = meta.get(key), run_meta.get(key)
        if key == "config" and isinstance(old, dict) and isinstance(new, dict):
            old = {k: v for k, v in old.items() if k not in _MAY_CHANGE_ON_RESUME}
            new = {k: v for k, v in new.items() if k not in _MAY_CHANGE_ON_RESUME}
        if old != new:
            diff = _first_difference(old, new)
            raise ConfigError(
                f"{out} holds a run with a different {key} ({diff}); use another output directory or resume=False"
            )
    load_weights(path, model)
    load_optimizer(path, optimizer, meta)
    result.history = [EpochRecord(**r) for r in meta.get("history", [])]
    result.best_epoch = meta.get("best_epoch")
    result.stopped_early = bool(meta.get("stopped_early"))
    result.resumed_from = epoch
    best = meta.get("best_val_acc")
    log.info("resuming %s after epoch %d", out, epoch)
    return epoch, (float(best) if best is not None else -1.0), int(meta.get("bad_epochs", 0))


def _start(
    out: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, run_meta: dict[str, Any],
    result: TrainResult, ranks: Ranks,
) -> tuple[int, float, int]:
    """Where the run starts, the same on every rank: ``(0, -1, 0)`` afresh, or ``_resume``'s
    ``(epoch, best validation accuracy, bad epochs)`` when ``out`` holds a run to resume."""
    start = (0, -1.0, 0)
    if out is not None and (out / "latest.json").is_file():
        start = _resume(out, model, optimizer, run_meta, result)
    ranks.agree(start[0], f"the epoch to resume after in {out}")
    ranks.broadcast_model(model)
    return start


def _first_difference(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
    return f"{old!r} there, {new!r} now"


def _finish(out: Path, model: nn.Module, run_meta: dict[str, Any], result: TrainResult, ranks: Ranks) -> None:
    """Write the final model (the best validation epoch under early stopping) to ``out`` (rank 0
    writes; every rank ends with the final weights)."""
    config = run_meta["config"]
    if config.get("patience") and result.best_epoch is not None:
        ranks.barrier()  # rank 0 has written the best epoch's checkpoint
        load_weights(_epoch_dir(out, result.best_epoch), model)
    if not ranks.is_writer:
        ranks.barrier()
        return
    history = [asdict(r) for r in result.history]
    meta = {
        **run_meta,
        "epoch": result.history[-1].epoch if result.history else 0,
        "history": history,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "final": True,
    }
    save_checkpoint(out / "final", model, meta)
    ranks.barrier()
