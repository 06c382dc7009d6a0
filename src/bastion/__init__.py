"""Bastion: attack, defend and honestly evaluate image classifiers under adversarial perturbations."""

__version__ = "0.1.0"
