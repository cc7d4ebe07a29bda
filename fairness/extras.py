"""Optional dependencies: a missing one is named with the extra that installs it."""

from __future__ import annotations


def missing(extra: str, error: ImportError) -> ImportError:
    """The error to raise when an optional import fails: what is missing and the pip command that brings it."""
    return ImportError(
        f"{error.name or 'a dependency'} is not installed; it comes with the {extra!r} extra: "
        f"pip install 'offload-moe[{extra}]'"
    )
