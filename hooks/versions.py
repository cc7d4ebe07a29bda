"""The one error every package of this project raises when a private internal of torch or transformers it relies on
is missing from the installed version (each package fences its internals in a `compat` module)."""

from __future__ import annotations


class IncompatibleVersionError(RuntimeError):
    """An internal of torch or transformers this project relies on is missing from the installed version; the
    message names the internal and the versions it is tested with."""
