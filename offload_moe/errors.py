"""offload-moe's own errors."""

from __future__ import annotations


class UnsupportedModelError(TypeError):
    """The model has no MoE block whose experts offload-moe can drive; the message names the class and why."""


class BudgetError(ValueError):
    """The expert budget cannot hold what the options need; the message says how much is needed."""
