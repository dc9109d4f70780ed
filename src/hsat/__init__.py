"""hsat: Hierarchical Self-Supervised Adversarial Training for histopathology encoders."""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("hgg", "lgg", "mening", "metast", "normal", "pituita", "schwan")
"""The seven OpenSRH diagnostic classes; a label's index is its position here."""

LEVELS: tuple[str, ...] = ("patient", "slide", "patch")
"""Levels of the patient -> slide -> patch hierarchy, coarsest first."""
