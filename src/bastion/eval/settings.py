"""How models are evaluated: the ``[evaluation]`` section of a harness config, typed.

The harness reads the config once and hands this object to the protocols, the batch loop and
the sanity checks as it is (no conversion to another settings class on the way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion import attacks
from bastion.config import option
from bastion.errors import ConfigError

PAPER = "paper"
ADAPTIVE = "adaptive"
#: the protocols, in the order they run
PROTOCOLS = (PAPER, ADAPTIVE)
NORMS = ("linf", "l2")
_POSITIVE = ("batch_size", "queries", "eot_samples", "expectation_draws", "gallery_samples", "shards")


@dataclass(frozen=True)
class EvaluationSection:
    """How every model is evaluated."""

    protocols: list[str] = option(list(PROTOCOLS), "protocols to run: paper (the seed's threat model) and/or adaptive")
    norm: str = option("linf", "threat model: linf or l2")
    batch_size: int = option(500, "points per attack call")
    seed: int = option(0, "seed of the attacks' and the random defenses' randomness")
    queries: int = option(5, "k: a random defense's point is robust only if right in a majority of k "
                             "independent queries")
    eot_samples: int = option(10, "adaptive: gradient draws per step (EOT) for defenses whose expectation is random")
    expectation_draws: int = option(10, "adaptive: draws averaged by the expected output of a random "
                                        "(non-population) defense")
    autoattack: bool = option(True, "adaptive: add AutoAttack (standard; 'rand' for random defenses)")
    autoattack_params: dict[str, Any] = option({}, "AutoAttack hyper-parameters, e.g. {steps = 20, n_queries = 500}")
    sanity: bool = option(True, "run the sanity checks after each (model, protocol)")
    artifacts: bool = option(True, "store a gallery of adversarial examples and a loss landscape per model")
    gallery_samples: int = option(8, "examples in each model's gallery")
    report: bool = option(True, "write the Markdown + HTML report at the end")
    guard: bool = option(True, "adaptive: when the 'converged' check fails, rerun that row's attack stronger "
                               "(the convergence guard, bastion.harness.guard)")
    guard_factor: int = option(5, "the guard's rerun: this many times the steps, and one more restart (at least 2)")
    guard_cost_cap: float = option(10.0, "the guard runs only if its estimated gradient evaluations are at most "
                                         "this many times those of the row it reruns")
    compile: bool = option(False, "compile each model's forward pass (torch.compile, in place) before attacking "
                                  "it: faster steps on some models and devices after slow first calls; its float "
                                  "order may differ from eager PyTorch's, so it is another config hash")
    channels_last: bool = option(False, "store each model's 4-d weights channels-last before attacking it (faster "
                                        "convolutions on CPUs with oneDNN); another config hash, as compile")
    shards: int = option(1, "measure each row as this many shards of the points (jobs an executor may run in "
                            "parallel, e.g. on Ray), merged into the one row; each shard's attack draws from its "
                            "own seed, so 2 or more shards give other draws than 1 (and another config hash)")

    def __post_init__(self) -> None:
        if not self.protocols:
            raise ConfigError("evaluation.protocols=[] must name at least one of 'paper', 'adaptive'")
        for p in self.protocols:
            if p not in PROTOCOLS:
                raise ConfigError(f"evaluation.protocols: {p!r} is not one of 'paper', 'adaptive'")
        for name in ("compile", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"evaluation.{name}={getattr(self, name)!r} must be true or false")
        if self.norm not in NORMS:
            raise ConfigError(f"evaluation.norm={self.norm!r} is not one of 'linf', 'l2'")
        for name in _POSITIVE:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"evaluation.{name}={v!r} must be an integer >= 1")
        if self.seed < 0:
            raise ConfigError(f"evaluation.seed={self.seed!r} must be >= 0")
        if not isinstance(self.guard, bool):
            raise ConfigError(f"evaluation.guard={self.guard!r} must be true or false")
        f = self.guard_factor
        if isinstance(f, bool) or not isinstance(f, int) or f < 2:
            raise ConfigError(f"evaluation.guard_factor={f!r} must be an integer >= 2")
        c = self.guard_cost_cap
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ConfigError(f"evaluation.guard_cost_cap={c!r} must be a number > 0")
        self._check_autoattack_params()

    def _check_autoattack_params(self) -> None:
        if not self.autoattack_params:
            return
        bad = {k for k in self.autoattack_params if k in ("eps", "norm", "version")}
        if bad:
            raise ConfigError(f"evaluation.autoattack_params: {sorted(bad)} are set by the harness")
        try:
            attacks.create("autoattack", eps=0.1, **self.autoattack_params)
        except ConfigError as e:
            raise ConfigError(f"evaluation.autoattack_params: {e}") from None

    def queries_for(self, protocol: str) -> int:
        """The judge's k under ``protocol``: the paper protocols query the deployed decision
        once, the adaptive protocol ``queries`` times."""
        return self.queries if protocol == ADAPTIVE else 1


__all__ = ["ADAPTIVE", "NORMS", "PAPER", "PROTOCOLS", "EvaluationSection"]
