"""The harness's typed TOML schema: what ``bastion run CONFIG`` trains, attacks and reports.

A harness config (see ``bastion/configs/quick.toml`` and ``configs/seeds/*.toml``)::

    name = "quick"
    out_dir = "runs/quick"          # models/<key>/ (cache), results.sqlite, report/
    [dataset]   name, train_fraction, subset_seed, eval_split, eval_samples
    [training]  TrainConfig defaults shared by every model (each model may override fields)
    [[models]]  id, arch, defense ("none" or a registry name), params, train (overrides),
                base (id of an already-trained model a wrapper defense builds on), seed, init;
                or a user model Bastion does not train: id, source, args, weights, key, output,
                mean, std, random, input_shape (and defense: the defense it implements, if any)
    [[attacks]] name, eps = [...], params = {...}
    [evaluation] protocols = ["paper", "adaptive"], queries (k), eot_samples, autoattack, ...

Everything is validated when loaded (:func:`load_harness_config`): a bad field fails with a
:class:`~bastion.errors.ConfigError` naming the field, its value and what is allowed; unknown
defense, attack, model and dataset names raise the registries' "did you mean" errors.

:func:`config_hash` is the hash stored with every result row: it covers everything that
determines the numbers (not ``out_dir``, ``db`` or the device), so a restarted run finds its
finished rows and a changed config gets new ones. For a user model that includes the content of
its weights and source files (:func:`bastion.harness.user_models.source_digest`); a config
without user models hashes exactly as before they existed.

User models (``source = ...``) are evaluated, never trained, under the protocols that apply to
them (:meth:`HarnessConfig.protocols_for`): the paper protocol is the threat model of a
defense's paper, so a user model runs it only if it names the defense it implements
(``defense = "sap"``); otherwise it runs the adaptive protocol alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bastion import attacks, defenses, models
from bastion import data as data_mod
from bastion.config import from_dict, load_toml, option, to_dict
from bastion.errors import ConfigError
from bastion.eval.settings import PAPER, PROTOCOLS, EvaluationSection
from bastion.eval.threats import row_label
from bastion.harness import user_models
from bastion.models.user import OUTPUTS
from bastion.train.config import TrainConfig


@dataclass(frozen=True)
class DatasetSection:
    """The data every model trains and is evaluated on."""

    name: str = option("mnist", "dataset registry name (see `bastion list datasets`)")
    root: str | None = option(None, "data directory (default: $BASTION_DATA or ~/.cache/bastion/data)")
    train_fraction: float = option(1.0, "fraction of the training split to train on")
    subset_seed: int = option(0, "seed choosing the training subset")
    eval_split: str = option("test", "split to evaluate on: test or train")
    eval_samples: int = option(1000, "evaluate on the first N points of eval_split (0: all)")
    path: str | None = option(None, "evaluate on this image folder (class folders of JPEG/PNG files, ImageNet's "
                                    "validation layout) instead of eval_split: its eval_samples points are a "
                                    "hashed subset (seed subset_seed), read lazily when they exceed 256 MiB")
    channels: int | None = option(None, "image folder: convert every image to 1 or 3 channels")
    resize: int | None = option(None, "image folder: scale the shorter side to this many pixels")
    crop: int | None = option(None, "image folder: then cut the centre square of this side")
    num_workers: int = option(0, "image folder: DataLoader workers decoding ahead of the attacks")
    stream: bool | None = option(None, "image folder: true streams, false reads into memory, unset decides by size")

    def __post_init__(self) -> None:
        self._check_folder()
        data_mod.DATASETS.get(self.name)
        if self.eval_split not in data_mod.SPLITS:
            raise ConfigError(f"dataset.eval_split={self.eval_split!r} is not one of 'train', 'test'")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"dataset.train_fraction={self.train_fraction!r} must be in (0, 1]")
        if self.subset_seed < 0:
            raise ConfigError(f"dataset.subset_seed={self.subset_seed!r} must be >= 0")
        if self.eval_samples < 0:
            raise ConfigError(f"dataset.eval_samples={self.eval_samples!r} must be >= 0")

    def _check_folder(self) -> None:
        for field in ("resize", "crop"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"dataset.{field}={v!r} must be an integer >= 1")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"dataset.channels={self.channels!r} must be 1 or 3")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"dataset.num_workers={self.num_workers!r} must be an integer >= 0")
        if self.path is None:
            return
        if not Path(self.path).is_dir():
            raise ConfigError(f"dataset.path={self.path!r} is not a directory (an image folder: path/<class>/<image>)")
        if self.eval_split != "test":
            raise ConfigError(f"dataset.eval_split={self.eval_split!r}: with dataset.path the folder is what is "
                              "evaluated; leave eval_split at 'test'")

    def folder_digest(self) -> str | None:
        """With ``path``: the digest of the evaluated points (labels, paths, sizes) and the
        pixel settings, which :func:`config_hash` uses instead of the folder's path."""
        if self.path is None:
            return None
        plan = data_mod.plan_image_folder(self.path, samples=self.eval_samples, seed=self.subset_seed,
                                          channels=self.channels, resize=self.resize, crop=self.crop, headers=False)
        return str(plan.manifest()["points_sha256"])


@dataclass(frozen=True)
class ModelEntry:
    """One model of the comparison: an architecture, a defense and how it is trained; or, with
    ``source``, a user model that Bastion evaluates without training (its fields after ``label``;
    ``defense`` then names the defense it implements, if any, which gives its paper protocol)."""

    id: str = option("", "unique name of the model in this config (used by `base` and in tables)")
    arch: str = option("lenet5", "model registry name (see `bastion list models`)")
    options: dict[str, Any] = option({}, "architecture options, e.g. {extra_skip = 4}")
    init: str | None = option(None, "weight initialisation (xavier-normal, kaiming-uniform, kaiming-normal, "
                                    "orthogonal)")
    seed: int = option(0, "seed of the initial weights and of training (overrides training.seed)")
    defense: str = option("none", "defense registry name (see `bastion list defenses`) or 'none'")
    params: dict[str, Any] = option({}, "defense hyper-parameters (the seed's defaults otherwise)")
    train: dict[str, Any] = option({}, "TrainConfig fields overriding [training] for this model")
    base: str | None = option(None, "id of an already-trained model this wrapper defense builds on (no retraining)")
    surrogate: str | None = option(None, "id of a model on which the paper protocol crafts the attacks, then "
                                         "transferred to this one (seed 003: the original model); the adaptive "
                                         "protocol adds these transfer rows to its own")
    label: str | None = option(None, "display name in tables (default: id)")
    source: str | None = option(None, "a user model, evaluated but not trained: FILE.py:FACTORY, "
                                      "package.module:FACTORY, torchscript:PATH, timm:NAME or hf:DIR")
    args: dict[str, Any] = option({}, "user model: factory arguments (timm: create_model's, with pretrained = true "
                                      "to download; hf: from_pretrained's, with allow_download = true for a Hub id)")
    weights: str | None = option(None, "user model: its weights, safetensors or a state dict read with "
                                       "weights_only=True (paths are relative to the working directory)")
    key: str | int | None = option(None, "user model: where its logits are in its output: a dict key, an attribute "
                                         "or a tuple index")
    output: str = option("logits", "user model: what it returns: logits, probabilities or binary-logit")
    mean: list[float] | None = option(None, "user model: per-channel normalisation it expects, applied inside "
                                            "(default: what a timm or hf source declares, else none)")
    std: list[float] | None = option(None, "user model: per-channel std to go with mean")
    random: bool = option(False, "user model: its forward pass is random (EOT, majority of k)")
    input_shape: list[int] | None = option(None, "user model: (C, H, W) it takes (default: the dataset's)")

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ConfigError(f"id={self.id!r} must be a non-empty string")
        self._check_user_fields()
        models.MODELS.get(self.arch)
        if not defenses.is_none(self.defense):
            entry = defenses.DEFENSES.get(self.defense)
            defenses.create(self.defense, **self.params)  # validates the parameters now
            if self.base is not None and not issubclass(entry.factory, defenses.ModelDefense):
                raise ConfigError(
                    f"base={self.base!r} (model {self.id!r}): only model-building defenses (sap, multi-sap, ...) "
                    f"wrap a "
                    f"trained model; {self.defense!r} is a training objective"
                )
        elif self.params:
            raise ConfigError(f"params={self.params!r} (model {self.id!r}) given but defense='none'")
        elif self.base is not None:
            raise ConfigError(f"base={self.base!r} (model {self.id!r}) needs a wrapper defense (sap, multi-sap)")
        if self.surrogate is not None and self.base is not None:
            raise ConfigError(f"surrogate={self.surrogate!r} (model {self.id!r}): a wrapper's attacks are already "
                              f"transferred from its base {self.base!r}; give one of the two")

    @property
    def name(self) -> str:
        return self.label or self.id

    @property
    def is_user(self) -> bool:
        """A user model: built from ``source``, evaluated, never trained."""
        return self.source is not None

    def _check_user_fields(self) -> None:
        """A user model sets none of the training fields; a trained model none of the user ones."""
        for name in USER_FIELDS if self.source is None else _TRAINING_FIELDS:
            value = getattr(self, name)
            if value != _default(ModelEntry, name):
                why = ("is a user-model field: set source= too" if self.source is None else
                       f"does not apply to a user model (source={self.source!r}): Bastion evaluates it, never "
                       "trains it")
                raise ConfigError(f"{name}={value!r} (model {self.id!r}) {why}")
        if self.source is None:
            return
        user_models.check_source(self.source, self.args, "")
        if self.weights is not None:
            user_models.file_sha256(self.weights, field="weights")
        if self.output not in OUTPUTS:
            raise ConfigError(f"output={self.output!r} (model {self.id!r}) is not one of {', '.join(OUTPUTS)}")
        mean, std = self.mean or [], self.std or []
        if (self.mean is None) != (self.std is None) or len(mean) != len(std) or any(v <= 0 for v in std) or (
                self.mean is not None and not mean):
            raise ConfigError(f"std={self.std!r} (model {self.id!r}) must give one positive value per channel of "
                              f"mean={self.mean!r} (both or neither)")
        if self.input_shape is not None and (len(self.input_shape) != 3 or min(self.input_shape) < 1):
            raise ConfigError(f"input_shape={self.input_shape!r} (model {self.id!r}) must be [C, H, W]")
        if self.params:
            raise ConfigError(f"params={self.params!r} (model {self.id!r}): a user model's defense only names the "
                              "paper threat model it is evaluated under; it takes no parameters")


def _default(cls: type, name: str) -> Any:
    """The default value of field ``name`` of dataclass ``cls``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


#: the [[models]] fields of a user model only (see :class:`ModelEntry`), left out of the
#: :func:`config_hash` of a model without ``source`` so that existing configs keep their hash
USER_FIELDS = ("source", "args", "weights", "key", "output", "mean", "std", "random", "input_shape")
#: the [[models]] fields that only a model Bastion trains may set (``params`` is checked apart)
_TRAINING_FIELDS = ("arch", "options", "init", "seed", "train", "base")


@dataclass(frozen=True)
class AttackEntry:
    """An attack at a list of budgets."""

    name: str = option("pgd", "attack registry name (see `bastion list attacks`)")
    eps: list[float] = option([0.3], "budgets, in input units ([0, 1] images)")
    params: dict[str, Any] = option({}, "attack hyper-parameters, e.g. {steps = 40, alpha = 0.01}")

    def __post_init__(self) -> None:
        attacks.ATTACKS.get(self.name)
        if not self.eps:
            raise ConfigError(f"eps=[] ({self.name}) must list at least one budget")
        for e in self.eps:
            if not e >= 0:
                raise ConfigError(f"eps={e!r} ({self.name}): every eps must be a number >= 0")
        for k in ("eps", "norm"):
            if k in self.params:
                raise ConfigError(f"params.{k} ({self.name}): set it with attacks.eps / evaluation.norm")
        try:
            attacks.create(self.name, eps=float(self.eps[0]), **self.params)
        except ConfigError as e:
            raise ConfigError(f"params ({self.name}): {e}") from None


@dataclass(frozen=True)
class HarnessConfig:
    """A whole comparison: data, models (with defenses), attacks, protocols."""

    name: str = option("experiment", "a name for the results")
    out_dir: str = option("runs/experiment", "where the model cache, the database and the report go")
    db: str | None = option(None, "results database (default: <out_dir>/results.sqlite)")
    device: str = option("auto", "cpu, cuda, cuda:N, mps, or auto")
    dataset: DatasetSection = option(DatasetSection(), "dataset and evaluation subset")
    training: dict[str, Any] = option({}, "TrainConfig defaults for every model (see `bastion train --help`)")
    models: list[ModelEntry] = option([], "the models compared ([[models]] tables)")
    attacks: list[AttackEntry] = option([], "the attacks ([[attacks]] tables)")
    evaluation: EvaluationSection = option(EvaluationSection(), "protocols and evaluation settings")

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models=[] must list at least one [[models]] table")
        if not self.attacks:
            raise ConfigError("attacks=[] must list at least one [[attacks]] table")
        ids = [m.id for m in self.models]
        for i, m in enumerate(self.models):
            if m.id in ids[:i]:
                raise ConfigError(f"models[{i}].id={m.id!r} is used twice; ids must be unique")
            known = ", ".join(repr(x) for x in ids[:i]) or "none"
            for what, ref in (("base", m.base), ("surrogate", m.surrogate)):
                if ref is not None and ref not in ids[:i]:
                    raise ConfigError(f"models[{m.id}].{what}={ref!r} must be the id of a model listed before it; "
                                      f"known: {known}")
            if m.base is not None and self.model(m.base).is_user:
                raise ConfigError(f"models[{m.id}].base={m.base!r} is a user model; a wrapper defense is built only "
                                  "around a model Bastion trained")
        trained = [m.id for m in self.models if not m.is_user]
        if self.dataset.path is not None and trained:
            raise ConfigError(f"dataset.path={self.dataset.path!r} evaluates on an image folder, but models {trained} "
                              "would be trained here on dataset.name's training split; with dataset.path give only "
                              "user models (source = ...)")
        self._check_row_labels()
        for m in self.models:
            self.train_config(m)  # every model's training config is valid
            if not self.protocols_for(m):
                raise ConfigError(f"evaluation.protocols={self.evaluation.protocols!r} gives user model {m.id!r} "
                                  "nothing to run: without a defense it has no paper threat model; add 'adaptive', "
                                  "or name the defense it implements (defense = NAME)")

    def _check_row_labels(self) -> None:
        """Rows are keyed by their label and budget: two [[attacks]] tables that give the same label
        at a shared eps would keep only one row, so they are refused."""
        seen: dict[tuple[str, float], int] = {}
        for i, a in enumerate(self.attacks):
            label = row_label(attacks.create(a.name, eps=float(a.eps[0]), **a.params))
            for e in a.eps:
                j = seen.setdefault((label, float(e)), i)
                if j != i:
                    raise ConfigError(f"attacks[{i}] ({a.name}, params={a.params}) gives the row label {label!r} at "
                                      f"eps {e:g}, as attacks[{j}] does; a row is kept per label and budget, so one "
                                      "would replace the other: change a step count or drop one table")

    # ------------------------------------------------------------------ derived
    def model(self, model_id: str) -> ModelEntry:
        for m in self.models:
            if m.id == model_id:
                return m
        raise ConfigError(f"no model with id {model_id!r}; ids: {', '.join(m.id for m in self.models)}")

    def protocols_for(self, m: ModelEntry) -> list[str]:
        """The protocols model ``m`` is evaluated under: ``evaluation.protocols``, less the paper
        protocol for a user model that names no defense (it has no paper)."""
        if m.is_user and defenses.is_none(m.defense):
            return [p for p in self.evaluation.protocols if p != PAPER]
        return list(self.evaluation.protocols)

    def train_config(self, m: ModelEntry) -> TrainConfig:
        """The :class:`~bastion.train.TrainConfig` of model ``m``: [training], then its overrides,
        its seed and the run's device."""
        raw = {**self.training, **m.train, "seed": m.seed, "device": self.device}
        return from_dict(TrainConfig, raw, where=f"models[{m.id}].train.")

    @property
    def db_path(self) -> Path:
        return Path(self.db) if self.db else Path(self.out_dir) / "results.sqlite"


#: bumped whenever the protocols change what a stored row means; part of :func:`config_hash`.
#: 2: transfer rows (surrogate / base network) and seed 001's crafting use the attack's final
#: iterate, as the seeds' libraries return it, instead of stopping at the first success.
#: 3: AutoAttack on random models (adaptive) and in transfer rows runs without early stopping
#: too (its components used to stop a point at its first success on one random draw).
#: 4: a classifier with a random forward pass (a noisy front end such as seed 004's denoiser)
#: is evaluated as a random defense (EOT, AutoAttack rand, majority of k), not as a deterministic one.
#: 5: the EOT attacks on random models keep the final iterate too (the EOT wrapper had been
#: built from the original attack, so they still stopped at a success on one random draw).
#: 6: on a random-submodel population AutoAttack runs at 100 iterations at least and ARC rows
#: join the adaptive protocol (issue 14).
#: 7: attacks on a population's exact (deterministic) expected output keep their final iterate
#: too: their early stop judged the expected output's argmax, not the deployed random draw.
#: 8: with a surrogate (a wrapper's base network), AutoAttack crafted on the surrogate at every
#: budget joins the adaptive transfer rows, so the adaptive worst case covers it (issue 14).
PROTOCOL_VERSION = 8

#: the convergence guard's settings at their defaults (left out of :func:`config_hash`: the guard
#: only adds rows, it never changes a stored one)
GUARD_DEFAULTS: dict[str, Any] = {"guard": True, "guard_factor": 5, "guard_cost_cap": 10.0}
#: evaluation fields left out of :func:`config_hash` at these values, so that a config that does
#: not use them hashes as before they existed: the guard's (it only adds rows, it never changes a
#: stored one), ``shards`` (one shard is the unsharded measurement), ``compile`` and
#: ``channels_last`` (off: eager PyTorch, as before they existed)
HASH_DEFAULTS: dict[str, Any] = {**GUARD_DEFAULTS, "shards": 1, "compile": False, "channels_last": False}


def plain(cfg: HarnessConfig) -> dict[str, Any]:
    """The config as plain JSON-serialisable data (round-trips through :func:`from_dict`)."""
    out = to_dict(cfg)
    return json.loads(json.dumps(out, default=str))


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex SHA-256 prefix of the canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def config_hash(cfg: HarnessConfig) -> str:
    """Hash of everything in ``cfg`` that determines the results (not out_dir/db/device/name)."""
    d = plain(cfg)
    for k in ("out_dir", "db", "device", "name"):
        d.pop(k, None)
    for m, entry in zip(cfg.models, d["models"], strict=True):
        if not m.is_user:
            for k in USER_FIELDS:  # a config without user models hashes as before they existed
                entry.pop(k, None)
        else:  # the content of its files, not only their names
            entry["digest"] = user_models.source_digest(str(m.source), m.weights)
    d["dataset"].pop("root", None)
    for k in ("path", "num_workers", "stream"):  # where the folder is and how it is read change no number
        d["dataset"].pop(k, None)
    if cfg.dataset.path is not None:  # which points, by content
        d["dataset"]["points"] = cfg.dataset.folder_digest()
    for k in ("channels", "resize", "crop"):  # a config without a folder hashes as before they existed
        if d["dataset"].get(k) is None:
            d["dataset"].pop(k, None)
    ev = d["evaluation"]
    for k in ("sanity", "artifacts", "gallery_samples", "report", "batch_size"):
        ev.pop(k, None)
    for k, default in HASH_DEFAULTS.items():  # a config that leaves these alone hashes as before they existed
        if ev.get(k) == default:
            ev.pop(k, None)
    # rows computed by an earlier version of the protocols are not reused by a later one
    d["protocol_version"] = PROTOCOL_VERSION
    return stable_hash(d)


def default_config_path() -> Path:
    """The packaged quick config (the README's main job)."""
    return Path(str(resources.files("bastion") / "configs" / "quick.toml"))


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted ``--set`` overrides (``a.b=v``; ``models.ID.field=v`` addresses a model by id)."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = raw
        for j, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                match = [t for t in node if isinstance(t, dict) and (t.get("id") == p or t.get("name") == p)]
                if not match:
                    raise ConfigError(f"--set {dotted}: no entry with id/name {p!r}")
                node = match[0]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {parts[j - 1]!r} is not a table")
            node = node.setdefault(p, {})
        if isinstance(node, list) or not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: cannot set a field there")
        node[parts[-1]] = value
    return raw


def load_harness_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> HarnessConfig:
    """Load and validate a harness config (default: the packaged quick config)."""
    raw = load_toml(path or default_config_path())
    raw = apply_overrides(raw, dict(overrides or {}))
    return from_dict(HarnessConfig, raw)


__all__ = [
    "PROTOCOLS",
    "USER_FIELDS",
    "AttackEntry",
    "DatasetSection",
    "EvaluationSection",
    "HarnessConfig",
    "ModelEntry",
    "apply_overrides",
    "config_hash",
    "default_config_path",
    "load_harness_config",
    "plain",
    "stable_hash",
]
