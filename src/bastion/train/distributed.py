"""Data-parallel training: N processes, one shard of every batch each, gradients all-reduced.

A run is started by ``torchrun --nproc-per-node N -m bastion train ...`` or by
``bastion train --nproc N ...``, which launches the same N local processes itself through
:mod:`torch.distributed.run` (torchrun's ``--standalone`` mode, in-process). Each process reads
its place from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins
one process group: ``gloo`` on CPU, ``nccl`` on CUDA (rank ``r`` of a node on ``cuda:LOCAL_RANK``).

What each rank does, on top of :func:`bastion.train.trainer.train` (which takes a :class:`Ranks`):

* **Shards.** Every rank draws the same epoch order and augmentation from ``(seed, epoch)``;
  global batch ``b`` (``batch_size`` points, as in one process) is cut into ``world`` contiguous
  parts and rank ``r`` trains on part ``r`` (:meth:`Ranks.share`). An objective, adversarial
  training included, sees only its rank's part, so adversarial examples are crafted per rank.
* **Gradients.** After ``backward`` each rank's gradient (of its part's mean loss) is weighted
  by its share of the batch and summed over the ranks (:meth:`Ranks.reduce_grads`, one
  ``all_reduce`` per dtype), so every rank steps with the gradient of the global batch's mean
  loss, up to the order of the float sums. This is an explicit all-reduce, not
  ``DistributedDataParallel``: objectives run extra forward and backward passes (attacks) that
  DDP's reducer would count as training steps.
* **Randomness inside the model** (dropout, attacks' random starts) is seeded per rank from the
  epoch seed (:meth:`Ranks.rank_seed`; rank 0 keeps the single-process seed).
* **Epoch boundary.** Metrics are summed over ranks; floating buffers (batch-norm statistics)
  are averaged; then rank 0's weights, objective metrics and validation accuracy are the run's
  (:meth:`Ranks.settle`; a rank whose weights differed is logged as a warning).
* **Checkpoints.** Rank 0 alone writes checkpoints, ``latest.json`` and ``final/``; every rank
  resumes from the same checkpoint (the run directory must be on a filesystem every rank sees;
  ranks that read different epochs stop with :class:`~bastion.errors.CheckpointError`).
* **A killed launcher kills its ranks.** torchrun starts each rank in a session of its own, so a
  SIGKILL of the launcher (or of its process group) would leave the ranks training, and writing
  the run directory, while a restarted run writes it too. Each rank therefore watches its parent
  process and exits within half a second of losing it (:func:`_exit_with_launcher`).

With one process (:data:`SINGLE`) every method is the identity and no process group exists:
the single-process path is the code it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bastion.errors import CheckpointError, ConfigError
from bastion.utils.device import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (``world == 1``: a single process).

    ``backend`` is ``"gloo"`` or ``"nccl"`` (empty for a single process); collectives use
    tensors on ``cuda:local_rank`` under NCCL and on the CPU under gloo.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes checkpoints, logs and prints (rank 0)."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The training device of this rank for the configured ``device`` ``name``: one process
        per GPU under data parallelism (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
        dev = resolve_device(name)
        if self.world == 1 or dev.type != "cuda":
            return dev
        if dev.index is not None and dev.index != self.local_rank:
            raise ConfigError(f"device={name!r} names one GPU, but data-parallel rank {self.rank} runs on "
                              f"cuda:{self.local_rank}; use device='cuda' or 'auto'")
        return torch.device("cuda", self.local_rank)

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def share(self, n: int) -> slice:
        """This rank's part of a global batch of ``n`` points: contiguous, sizes differing by at
        most one (a rank's part may be empty when ``n < world``)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def rank_seed(self, seed: int) -> int:
        """The seed of randomness inside the model (dropout, random starts) on this rank: ``seed``
        itself on rank 0, a different one on every other rank."""
        if self.rank == 0:
            return seed
        return (seed * 6_364_136_223_846_793_005 + self.rank * 1_442_695_040_888_963_407) % (2**63 - 1)

    def reduce_grads(self, model: nn.Module, n_local: int, n_total: int) -> None:
        """Replace every trainable parameter's gradient by the batch gradient: the sum over ranks
        of ``n_local / n_total`` times the rank's gradient. A parameter that no rank gave a
        gradient keeps ``grad = None`` (optimisers skip it, as in one process)."""
        if self.world == 1:
            return
        groups: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in model.parameters():
            if p.requires_grad:
                groups.setdefault(p.dtype, []).append(p)
        scale = n_local / n_total
        for dtype, params in groups.items():
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * scale for p in params]
            have = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=grads[0].device)
            flat = torch.cat([*grads, have])
            dist.all_reduce(flat)
            chunks = flat.split([p.numel() for p in params] + [len(params)])
            for p, chunk, flag in zip(params, chunks, chunks[-1].tolist(), strict=False):
                p.grad = chunk.view_as(p) if flag > 0 else None

    def total(self, *values: float) -> tuple[float, ...]:
        """``values`` summed over the ranks (in float64)."""
        if self.world == 1:
            return tuple(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return tuple(float(v) for v in t.tolist())

    def average_buffers(self, model: nn.Module) -> None:
        """Average the floating buffers (batch-norm running statistics) over the ranks; integer
        buffers (batch-norm's batch counts) take their largest value, the count of a rank that
        saw every batch (the last rank's part of a batch is never empty)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for buf in model.buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf)
                    buf.div_(self.world)
                elif buf.dtype != torch.bool:
                    dist.all_reduce(buf, op=dist.ReduceOp.MAX)

    def settle(self, model: nn.Module, value: Any) -> Any:
        """Make rank 0's weights and buffers every rank's, and return rank 0's ``value``. Ranks
        hold the same weights unless an objective's hook changed them from rank-local data
        (e.g. a catastrophic-overfitting restore); that is logged."""
        if self.world == 1:
            return value
        digests: list[Any] = [None] * self.world
        dist.all_gather_object(digests, _digest(model))
        if len(set(digests)) > 1:
            log.warning("data-parallel ranks held different weights at the end of an epoch "
                        "(an objective hook acted on rank-local data); rank 0's weights are kept")
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, value: Any, what: str) -> None:
        """Raise :class:`CheckpointError` unless every rank holds the same ``value``."""
        if self.world == 1:
            return
        seen: list[Any] = [None] * self.world
        dist.all_gather_object(seen, value)
        if any(v != seen[0] for v in seen):
            raise CheckpointError(f"data-parallel ranks disagree on {what} ({seen}); the run directory must be "
                                  "on a filesystem that every rank sees")

    def broadcast_model(self, model: nn.Module) -> None:
        """Copy rank 0's weights and buffers to every rank (the start of a run)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


#: a single process: every collective is the identity
SINGLE = Ranks()


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_nproc(nproc: int | None) -> int:
    """``--nproc`` (``None``: 1) as an integer >= 1, else :class:`ConfigError`."""
    if nproc is None:
        return 1
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc={nproc!r} must be an integer >= 1 (processes on this machine)")
    return nproc


def launched() -> bool:
    """Whether this process was started by torchrun (or :func:`launch`): ``WORLD_SIZE`` is set."""
    return "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer (set by torchrun)") from None


def from_env(nproc: int | None = None) -> Ranks:
    """This process's :class:`Ranks` from torchrun's environment (:data:`SINGLE` outside one).
    ``nproc``, when given, must equal the number of processes launched on this node."""
    if not launched():
        return SINGLE
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world
    if nproc is not None and nproc != local_world:
        raise ConfigError(f"nproc={nproc} but torchrun launched {local_world} processes on this node; "
                          "drop --nproc under torchrun")
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}: the rank must be in [0, WORLD_SIZE)")
    return Ranks(rank, world, local)


def _exit_with_launcher(rank: int, period: float = 0.5) -> None:
    """Exit this process (status 1, without clean-up) once its parent, the launcher, is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        print(f"bastion: error: data-parallel rank {rank} lost its launcher (pid {parent}); stopping",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="bastion-launcher-watch", daemon=True).start()


@contextmanager
def session(device: str, nproc: int | None = None) -> Iterator[Ranks]:
    """Join the process group of a torchrun launch for the duration of the block (``gloo`` when
    training on the CPU, ``nccl`` on CUDA) and yield this process's :class:`Ranks`; outside a
    launch, or with one process, yield a single-process :class:`Ranks` and start nothing."""
    ranks = from_env(nproc)
    if ranks.world == 1:
        yield Ranks(ranks.rank, 1, ranks.local_rank)
        return
    kind = resolve_device(device).type
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: data-parallel training runs on cpu (gloo) or cuda (nccl), not {kind}")
    backend = "nccl" if kind == "cuda" else "gloo"
    ranks = Ranks(ranks.rank, ranks.world, ranks.local_rank, backend)
    _exit_with_launcher(ranks.rank)
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(backend=backend, rank=ranks.rank, world_size=ranks.world)
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def launch(nproc: int, module: str, argv: Sequence[str]) -> int:
    """Run ``python -m module *argv`` in ``nproc`` local processes with :mod:`torch.distributed.run`
    (as ``torchrun --standalone --nproc-per-node nproc``). Returns 0, or the exit status of the
    first rank that failed (each rank reports its own error on stderr)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    check_nproc(nproc)
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", module, *argv]
    )
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        log.info("data-parallel rank %d failed: %s", failure.local_rank, failure.message)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


__all__ = ["SINGLE", "Ranks", "check_nproc", "from_env", "launch", "launched", "session"]
