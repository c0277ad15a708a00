"""Typed errors of the quantizer; the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class QuantError(Exception):
    """Base class: a user-facing problem with the input, the recipe or the output."""


class CheckpointError(QuantError):
    """The source checkpoint is missing, malformed or unsupported."""


class RecipeError(QuantError):
    """A recipe, rule or type name is invalid."""


class ImatrixError(QuantError):
    """An importance matrix is unreadable or does not match the model."""


class EvalError(QuantError):
    """Evaluation inputs are unusable: too little text, mismatched models or a foreign cache."""


class VerifyError(QuantError):
    """A written GGUF does not match its source."""
