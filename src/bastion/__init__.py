"""Bastion: attack, defend and honestly evaluate image classifiers under adversarial perturbations.

``bastion.audit(model, data, eps=[...])`` evaluates your own network (see ``docs/audit.md``);
it is :func:`bastion.harness.audit.audit`, imported on first use.
"""

from typing import Any

from bastion._version import __version__

__all__ = ["__version__", "audit"]


def __getattr__(name: str) -> Any:
    if name == "audit":
        from bastion.harness.audit import audit

        return audit
    raise AttributeError(f"module 'bastion' has no attribute {name!r}")
